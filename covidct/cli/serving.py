"""Serving: `covidct serve`, a pushed version behind a standard inference protocol."""

from __future__ import annotations

import click

from covidct.cli.options import friendly


@click.command("serve")
@click.argument("serving_dir", type=click.Path())
@click.option("--version", "version", type=int, default=None,
              help="Serve this pushed version (default: the latest blessed one, and newer ones as they are pushed).")
@click.option("--runtime", type=click.Choice(["onnxruntime", "litert", "tensorflow", "openvino"]), default=None,
              help="Default: the copy and runtime `covidct bench` recommended for the version.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 exposes the server to the network.")
@click.option("--http-port", default=8080, show_default=True, type=click.IntRange(1, 65535),
              help="REST: OIP v2 and TF-Serving-style v1.")
@click.option("--grpc-port", default=8081, show_default=True, type=click.IntRange(0, 65535), help="OIP v2 gRPC (0: off).")
@click.option("--max-batch", default=64, show_default=True, type=int, help="Most images in one request.")
@click.option("--max-body-mb", default=32, show_default=True, type=int, help="Largest request body.")
@click.option("--reload-seconds", default=5.0, show_default=True, type=float,
              help="How often to look for a newer blessed version (0: never).")
@click.option("--request-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds within which a REST request's headers and body must arrive (else 408, closed).")
@friendly
def serve_cmd(serving_dir, version, runtime, host, http_port, grpc_port, max_batch, max_body_mb, reload_seconds,
              request_timeout):
  """Serve a pushed version (KServe model server): OIP v2 REST and gRPC, and v1 `:predict` with b64 images."""
  from covidct.serve import serve  # pylint: disable=import-outside-toplevel

  serve(serving_dir, version=version, runtime=runtime, host=host, http_port=http_port, grpc_port=grpc_port,
        max_batch=max_batch, max_body_bytes=max_body_mb * 1024 * 1024, reload_seconds=reload_seconds,
        request_timeout=request_timeout,
        ready=lambda v: click.echo(f"serving {serving_dir} version {v} on http://{host}:{http_port} "
                                   f"(v1 /v1/models/covidct:predict, v2 /v2/models/covidct/infer)"
                                   + (f" and grpc {host}:{grpc_port}" if grpc_port else ""), err=True))
