// afs._native: the model-independent native module of the afs package (tokenizer and chat template).
//
// The engine modules built per model link the same runtime; this one exists so that the tokenizer can
// be used (and tested against HF tokenizers) without building an engine. The GIL is released while
// encoding and decoding. afs::Error surfaces as afs._native.Error, a subclass of ValueError.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "afs/error.h"
#include "afs/fp8.h"
#include "afs/stop_strings.h"
#include "afs/tokenizer/chat.h"
#include "afs/tokenizer/tokenizer.h"
#include "afs/tokenizer/unicode_tables.h"

namespace nb = nanobind;

namespace {

// A view of a str (as UTF-8) or bytes argument; the object must outlive the view.
std::string_view text_view(const nb::handle& obj) {
  if (PyUnicode_Check(obj.ptr())) {
    Py_ssize_t n = 0;
    const char* p = PyUnicode_AsUTF8AndSize(obj.ptr(), &n);
    if (!p) throw nb::python_error();  // e.g. lone surrogates
    return {p, static_cast<size_t>(n)};
  }
  if (PyBytes_Check(obj.ptr())) {
    return {PyBytes_AS_STRING(obj.ptr()), static_cast<size_t>(PyBytes_GET_SIZE(obj.ptr()))};
  }
  if (PyByteArray_Check(obj.ptr())) {
    return {PyByteArray_AS_STRING(obj.ptr()), static_cast<size_t>(PyByteArray_GET_SIZE(obj.ptr()))};
  }
  throw nb::type_error("text must be str, bytes or bytearray");
}

nb::list to_list(const std::vector<int32_t>& ids) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(ids.size()));
  if (!list) throw nb::python_error();
  for (size_t i = 0; i < ids.size(); ++i) {
    PyObject* v = PyLong_FromLong(ids[i]);
    if (!v) {
      Py_DECREF(list);
      throw nb::python_error();
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), v);
  }
  return nb::steal<nb::list>(list);
}

std::vector<int32_t> ids_from(const nb::handle& seq) {
  std::vector<int32_t> ids;
  nb::sequence s = nb::borrow<nb::sequence>(seq);
  const size_t n = nb::len(s);
  ids.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const long long v = nb::cast<long long>(s[i]);
    // Ids outside int32 can be no token: decode skips them like any other unknown id.
    ids.push_back(v < INT32_MIN || v > INT32_MAX ? -1 : static_cast<int32_t>(v));
  }
  return ids;
}

std::vector<afs::ChatMessage> messages_from(const nb::handle& list) {
  std::vector<afs::ChatMessage> out;
  for (nb::handle m : nb::borrow<nb::sequence>(list)) {
    if (PyDict_Check(m.ptr())) {
      nb::dict d = nb::borrow<nb::dict>(m);
      if (!d.contains("role") || !d.contains("content")) throw nb::value_error("each message needs 'role' and 'content'");
      out.push_back({nb::cast<std::string>(d["role"]), nb::cast<std::string>(d["content"])});
    } else {
      auto p = nb::cast<std::pair<std::string, std::string>>(m);
      out.push_back({p.first, p.second});
    }
  }
  return out;
}

}  // namespace

NB_MODULE(_native, m) {
  m.doc() = "afs native runtime: byte-level BPE tokenizer with HF parity, compiled chat templates";
  nb::exception<afs::Error>(m, "Error", PyExc_ValueError);
  m.attr("unicode_version") = afs::unicode::kUnicodeVersion;
  // The CPU backend's fp8 K/V rounding, as bytes (tested against torch.float8_e4m3fn).
  m.def(
      "fp8_e4m3_bytes",
      [](const std::vector<float>& values) {
        std::string out(values.size(), '\0');
        for (size_t i = 0; i < values.size(); ++i) out[i] = static_cast<char>(afs::fp8_e4m3_from_float(values[i]));
        return nb::bytes(out.data(), out.size());
      },
      nb::arg("values"));
  m.def(
      "fp8_e4m3_values",
      [](const nb::bytes& b) {
        std::vector<float> out(b.size());
        const auto* p = static_cast<const uint8_t*>(static_cast<const void*>(b.c_str()));
        for (size_t i = 0; i < out.size(); ++i) out[i] = afs::fp8_e4m3_to_float(p[i]);
        return out;
      },
      nb::arg("data"));

  nb::class_<afs::Tokenizer>(m, "Tokenizer")
      .def(
          "__init__",
          [](afs::Tokenizer* self, const std::string& tokenizer_json, const std::string& options_json) {
            new (self) afs::Tokenizer(afs::Tokenizer::from_json(tokenizer_json, options_json));
          },
          nb::arg("tokenizer_json"), nb::arg("options_json") = "",
          "Build from tokenizer.json text and the manifest's tokenizer options (JSON text).")
      .def_static(
          "from_file",
          [](const std::string& path, const std::string& options_json) {
            return afs::Tokenizer::from_file(path, afs::TokenizerOptions::from_json(options_json));
          },
          nb::arg("path"), nb::arg("options_json") = "")
      .def(
          "encode",
          [](const afs::Tokenizer& t, nb::handle text, bool add_special_tokens) {
            const std::string_view v = text_view(text);
            std::vector<int32_t> ids;
            {
              nb::gil_scoped_release release;
              ids = t.encode(v, add_special_tokens);
            }
            return to_list(ids);
          },
          nb::arg("text"), nb::arg("add_special_tokens") = true)
      .def(
          "encode_batch",
          [](const afs::Tokenizer& t, nb::handle texts, bool add_special_tokens, int num_threads) {
            std::vector<nb::object> keep;
            std::vector<std::string_view> views;
            for (nb::handle h : nb::borrow<nb::sequence>(texts)) {
              keep.push_back(nb::borrow(h));
              views.push_back(text_view(h));
            }
            std::vector<std::vector<int32_t>> results(views.size());
            std::vector<std::string> errors(views.size());
            {
              nb::gil_scoped_release release;
              size_t workers = num_threads > 0 ? static_cast<size_t>(num_threads)
                                               : std::max(1u, std::thread::hardware_concurrency());
              workers = std::min(workers, views.size());
              auto run = [&](size_t w) {
                for (size_t i = w; i < views.size(); i += workers) {
                  try {
                    results[i] = t.encode(views[i], add_special_tokens);
                  } catch (const afs::Error& e) {
                    errors[i] = "text " + std::to_string(i) + ": " + e.what();
                  }
                }
              };
              if (workers <= 1) {
                if (!views.empty()) run(0);
              } else {
                std::vector<std::thread> pool;
                for (size_t w = 0; w < workers; ++w) pool.emplace_back(run, w);
                for (auto& th : pool) th.join();
              }
            }
            for (const std::string& e : errors)
              if (!e.empty()) throw afs::Error(e);
            nb::list out;
            for (const auto& ids : results) out.append(to_list(ids));
            return out;
          },
          nb::arg("texts"), nb::arg("add_special_tokens") = true, nb::arg("num_threads") = 0,
          "Encode many texts on num_threads threads (0: one per core).")
      .def(
          "decode",
          [](const afs::Tokenizer& t, nb::handle ids, bool skip_special_tokens) {
            const std::vector<int32_t> v = ids_from(ids);
            nb::gil_scoped_release release;
            return t.decode(v, skip_special_tokens);
          },
          nb::arg("ids"), nb::arg("skip_special_tokens") = false)
      .def("token_to_id",
           [](const afs::Tokenizer& t, const std::string& token) -> std::optional<int32_t> {
             const int32_t id = t.token_to_id(token);
             if (id < 0) return std::nullopt;
             return id;
           })
      .def("id_to_token", &afs::Tokenizer::id_to_token, nb::arg("id"))
      .def(
          "token_bytes",
          [](const afs::Tokenizer& t, int32_t id) {
            std::string out;
            t.append_token_bytes(id, false, out);
            return nb::bytes(out.data(), out.size());
          },
          nb::arg("id"), "The raw bytes token `id` stands for (b'' for an unknown id).")
      .def("pre_tokenize", [](const afs::Tokenizer& t, nb::handle text) { return t.pre_tokenize(text_view(text)); },
           nb::arg("text"), "The words the pre-tokenizer cuts `text` into (added tokens are not cut out).")
      .def("is_special", &afs::Tokenizer::is_special, nb::arg("id"))
      .def_prop_ro("vocab_size", &afs::Tokenizer::vocab_size)
      .def_prop_ro("id_space", &afs::Tokenizer::id_space)
      .def_prop_ro("options_json", [](const afs::Tokenizer& t) { return t.options().to_json(); })
      .def_prop_ro("bos_token_id",
                   [](const afs::Tokenizer& t) -> std::optional<int32_t> {
                     if (t.options().bos_token_id < 0) return std::nullopt;
                     return t.options().bos_token_id;
                   })
      .def_prop_ro("eos_token_id", [](const afs::Tokenizer& t) -> std::optional<int32_t> {
        if (t.options().eos_token_id < 0) return std::nullopt;
        return t.options().eos_token_id;
      });

  nb::class_<afs::StreamDecoder>(m, "StreamDecoder")
      .def(nb::init<const afs::Tokenizer&, bool>(), nb::arg("tokenizer"), nb::arg("skip_special_tokens") = false,
           nb::keep_alive<1, 2>())
      .def("step", [](afs::StreamDecoder& d, int32_t id) { return d.step(id); }, nb::arg("id"),
           "Feed one id; returns the text that is now complete (possibly empty).")
      .def("flush", &afs::StreamDecoder::flush, "Returns what is held back (an incomplete character as U+FFFD).")
      .def("reset", &afs::StreamDecoder::reset);

  nb::class_<afs::StopStrings>(m, "StopStrings",
                               "Cuts streamed text before the first stop string, holding back a tail that may "
                               "still grow into one.")
      .def(nb::init<std::vector<std::string>>(), nb::arg("stops"))
      .def("push", [](afs::StopStrings& s, const std::string& text) { return s.push(text); }, nb::arg("text"),
           "Append text; returns the text that is now final (possibly empty).")
      .def("finish", &afs::StopStrings::finish, "The text held back, at the end of generation.")
      .def_prop_ro("stopped", &afs::StopStrings::stopped);

  nb::class_<afs::ChatTemplate>(m, "ChatTemplate")
      .def("__init__",
           [](afs::ChatTemplate* self, const std::string& compiled_json) {
             new (self) afs::ChatTemplate(afs::ChatTemplate::from_json(compiled_json));
           },
           nb::arg("compiled_json"))
      .def(
          "apply",
          [](const afs::ChatTemplate& c, nb::handle messages, bool add_generation_prompt) {
            return c.apply(messages_from(messages), add_generation_prompt);
          },
          nb::arg("messages"), nb::arg("add_generation_prompt") = true)
      .def_prop_ro("roles", &afs::ChatTemplate::roles);
}
