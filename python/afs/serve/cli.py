"""afs-serve: an OpenAI-compatible HTTP server for an engine built by afs-build.

    afs-serve ENGINE_DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-queue N]
              [--served-model-name NAME] [--max-context N] [--kv-blocks N] [--threads N] ...

SIGTERM or SIGINT: stop accepting connections, let in-flight requests finish for up to
--drain-timeout seconds (then cancel them), and exit with status 0.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("engine_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--api-key", envvar="AFS_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1 endpoints (or set AFS_API_KEY).")
@click.option("--max-queue", default=512, show_default=True, type=click.IntRange(1),
              help="Most requests (choices) in the engine at once, running or waiting; more get 429.")
@click.option("--served-model-name", default=None, help="Model name clients use (default: the engine directory's name).")
@click.option("--max-context", default=0, show_default=True, type=click.IntRange(0),
              help="Context limit in tokens (0: the model's).")
@click.option("--kv-blocks", default=0, show_default=True, type=click.IntRange(0),
              help="KV-cache blocks (0: the engine's default).")
@click.option("--kv-block-size", default=16, show_default=True, type=click.IntRange(1), help="Tokens per KV-cache block.")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0), help="CPU threads (0: all).")
@click.option("--max-batch-tokens", default=0, show_default=True, type=click.IntRange(0),
              help="Tokens per scheduler step (0: the backend's default).")
@click.option("--gpu-memory-fraction", default=0.9, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True),
              help="CUDA: share of GPU memory the engine may use.")
@click.option("--kv-cache-dtype", default="auto", show_default=True, type=click.Choice(["auto", "fp8"]),
              help="K/V cache element type: auto (the weight type; CPU float32) or fp8 (e4m3, 1 byte, no scale).")
@click.option("--max-body-bytes", default=1 << 20, show_default=True, type=click.IntRange(1),
              help="Largest request body accepted (larger: 413).")
@click.option("--drain-timeout", default=30.0, show_default=True, type=click.FloatRange(0.0),
              help="Seconds in-flight requests may take to finish after SIGTERM.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def main(engine_dir: Path, host: str, port: int, api_key: str | None, max_queue: int, served_model_name: str | None,
         max_context: int, kv_blocks: int, kv_block_size: int, threads: int, max_batch_tokens: int,
         gpu_memory_fraction: float, kv_cache_dtype: str, max_body_bytes: int, drain_timeout: float,
         log_level: str) -> None:
    """Serve the engine in ENGINE_DIR with the OpenAI API (completions, chat completions, models)."""
    try:
        import uvicorn

        from .app import ServerConfig, create_app
        from .draining import DrainingServer
    except ImportError as e:
        raise click.ClickException(f"afs-serve needs FastAPI and uvicorn ({e}); install them with: "
                                   "pip install 'afs[serve]'") from None
    import afs

    try:
        engine = afs.load(engine_dir, max_context=max_context, threads=threads, kv_blocks=kv_blocks,
                          kv_block_size=kv_block_size, max_batch_tokens=max_batch_tokens,
                          gpu_memory_fraction=gpu_memory_fraction, kv_cache_dtype=kv_cache_dtype)
        engine.tokenizer  # noqa: B018 - text in and out needs one
    except afs.EngineError as e:
        raise click.ClickException(str(e)) from None
    name = served_model_name or engine_dir.resolve().name
    app = create_app(engine, ServerConfig(model_name=name, api_key=api_key, max_queue=max_queue,
                                          max_body_bytes=max_body_bytes))
    click.echo(f"afs-serve: {engine.backend} engine {engine_dir} as model '{name}' on http://{host}:{port}/v1"
               + (" (API key required)" if api_key else ""), err=True)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                            lifespan="off")
    DrainingServer(config, app.state.server).run()


if __name__ == "__main__":
    main()
