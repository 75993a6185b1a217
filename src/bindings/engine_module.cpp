// The engine's nanobind module (named _afs_engine_<spec hash>, loaded by afs.load). A thin layer:
// argument conversion, the GIL released around every call into the engine, afs::Error -> afs
// EngineError (a ValueError).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include "afs/engine.h"
#include "afs/error.h"

namespace nb = nanobind;

namespace {

nb::dict result_dict(const afs::GenerateResult& r) {
  nb::dict d;
  d["tokens"] = r.tokens;
  d["finish_reason"] = r.finish_reason;
  d["prefill_seconds"] = r.prefill_seconds;
  d["decode_seconds"] = r.decode_seconds;
  return d;
}

}  // namespace

NB_MODULE(AFS_MODULE_NAME, m) {
  m.doc() = "afs engine module (model-specialised, compiled by afs-build)";
  m.attr("spec_hash") = afs::kCompiledSpecHash;
  m.attr("spec_name") = afs::kCompiledSpecName;
  static nb::exception<afs::Error> engine_error(m, "EngineError", PyExc_ValueError);

  nb::class_<afs::Engine>(m, "Engine")
      .def_static(
          "load",
          [](const std::string& path, int max_context, int threads, bool cuda_graphs) {
            afs::RuntimeOptions o;
            o.max_context = max_context;
            o.threads = threads;
            o.cuda_graphs = cuda_graphs;
            nb::gil_scoped_release release;
            return afs::Engine::load(path, o);
          },
          nb::arg("path"), nb::arg("max_context") = 0, nb::arg("threads") = 0, nb::arg("cuda_graphs") = true)
      .def_prop_ro("vocab_size", &afs::Engine::vocab_size)
      .def_prop_ro("max_context", &afs::Engine::max_context)
      .def_prop_ro("eos_token_ids", [](const afs::Engine& e) { return e.eos_ids(); })
      .def_prop_ro("backend", [](const afs::Engine& e) { return std::string(e.backend().name()); })
      .def_prop_ro("manifest_json", [](const afs::Engine& e) { return e.file().manifest_text(); })
      .def(
          "score",
          [](afs::Engine& e, const std::vector<int32_t>& ids) {
            auto* out = new std::vector<float>();
            {
              nb::gil_scoped_release release;
              try {
                *out = e.score(ids);
              } catch (...) {
                delete out;
                throw;
              }
            }
            nb::capsule owner(out, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
            const size_t shape[2] = {ids.size(), static_cast<size_t>(e.vocab_size())};
            return nb::ndarray<nb::numpy, float, nb::ndim<2>>(out->data(), 2, shape, owner);
          },
          nb::arg("token_ids"), "Logits at every position: float32 array (len, vocab).")
      .def(
          "generate",
          [](afs::Engine& e, const std::vector<int32_t>& ids, int max_tokens, float temperature, int top_k, float top_p,
             float min_p, uint64_t seed, const std::vector<int32_t>& stop_ids, bool ignore_eos) {
            afs::GenerateRequest req;
            req.prompt = ids;
            req.max_tokens = max_tokens;
            req.sampling.temperature = temperature;
            req.sampling.top_k = top_k;
            req.sampling.top_p = top_p;
            req.sampling.min_p = min_p;
            req.sampling.seed = seed;
            req.stop_ids = stop_ids;
            req.ignore_eos = ignore_eos;
            afs::GenerateResult r;
            {
              nb::gil_scoped_release release;
              r = e.generate(req);
            }
            return result_dict(r);
          },
          nb::arg("token_ids"), nb::arg("max_tokens") = 16, nb::arg("temperature") = 0.0f, nb::arg("top_k") = 0,
          nb::arg("top_p") = 1.0f, nb::arg("min_p") = 0.0f, nb::arg("seed") = 0,
          nb::arg("stop_token_ids") = std::vector<int32_t>(), nb::arg("ignore_eos") = false)
      .def(
          "bench",
          [](afs::Engine& e, int prompt_tokens, int gen_tokens, int warmup) {
            afs::BenchResult b;
            {
              nb::gil_scoped_release release;
              b = e.bench(prompt_tokens, gen_tokens, warmup);
            }
            nb::dict d;
            d["prompt_tokens"] = b.prompt_tokens;
            d["gen_tokens"] = b.generated_tokens;
            d["prefill_tok_s"] = b.prefill_tok_s();
            d["decode_tok_s"] = b.decode_tok_s();
            return d;
          },
          nb::arg("prompt_tokens") = 128, nb::arg("gen_tokens") = 64, nb::arg("warmup") = 1);
}
