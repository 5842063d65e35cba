"""Whole jobs: the benchmark and the main job (pipeline)."""

from __future__ import annotations

import click

from covidct.cli.options import (BOOTSTRAP, DATA_DIR, SOURCES_ROOT, WEIGHTS_DIR, friendly, given, int_list,
                                 positive)
from covidct.config import MODEL_OF_RECORD, RECIPES


@click.command("bench")
@click.argument("artifacts_dir", type=click.Path())
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Report folder (default: ARTIFACTS_DIR/bench).")
@click.option("--batch-sizes", default="1,8,32", show_default=True, callback=int_list)
@click.option("--threads", default="1,2", show_default=True, callback=int_list)
@click.option("--runs", default=50, show_default=True, type=int, callback=positive, help="Timed runs per batch size.")
@click.option("--warmup", default=5, show_default=True, type=int)
@click.option("--max-seconds", default=5.0, show_default=True, type=float,
              help="Stop timing a batch size after this long (at least 5 runs).")
@click.option("--no-pipeline", is_flag=True, help="Skip the input-pipeline measurement.")
@click.option("--runtimes", default=None, metavar="LIST",
              help="Only these runtimes, comma-separated: tf_signature, keras_predict, keras_call, litert, ort, "
                   "tf_signature_gpu, ort_cuda, ort_tensorrt (default: all). E.g. 'ort,ort_cuda' on a GPU machine "
                   "without TensorFlow.")
@DATA_DIR
@click.option("--load-test", "load_seconds", type=float, default=None, metavar="SECONDS",
              help="Also serve the export (covidct serve, loopback) and load it with Locust at 1, 8 and 32 concurrent "
                   "clients, SECONDS each.")
@click.option("--overwrite", is_flag=True)
@friendly
def bench_cmd(artifacts_dir, out_dir, batch_sizes, threads, runs, warmup, max_seconds, no_pipeline, runtimes, data_dir,
              load_seconds, overwrite):
  """Latency and throughput of every artifact in ARTIFACTS_DIR (a `covidct export` folder) on every runtime."""
  import pathlib  # pylint: disable=import-outside-toplevel

  from covidct.fsutil import refuse_existing  # pylint: disable=import-outside-toplevel

  out = pathlib.Path(out_dir) if out_dir else pathlib.Path(artifacts_dir) / "bench"
  refuse_existing(out, overwrite)
  from benchmarks.report import markdown  # pylint: disable=import-outside-toplevel
  from benchmarks.run import run_benchmark  # pylint: disable=import-outside-toplevel

  report = run_benchmark(artifacts_dir, out, batch_sizes, threads, runs, warmup, max_seconds, data_dir=data_dir,
                         pipeline=not no_pipeline, overwrite=overwrite, progress=lambda m: click.echo(m, err=True),
                         runtimes=[r.strip() for r in runtimes.split(",") if r.strip()] if runtimes else None,
                         load_seconds=load_seconds)
  click.echo(markdown(report))
  click.echo(f"Report: {out}/bench.md")


@click.command("bench-compare")
@click.argument("exports", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Report folder (must not exist).")
@click.option("--rounds", default=15, show_default=True, type=int, callback=positive,
              help="Each artifact x runtime runs once per round, all rows in turn.")
@click.option("--batch-size", default=1, show_default=True, type=int, callback=positive)
@click.option("--threads", default=1, show_default=True, type=int, callback=positive)
@click.option("--runtimes", default=None, metavar="LIST",
              help="Only these runtimes, comma-separated (default: all but the Keras rows).")
@click.option("--max-isa", type=click.Choice(["avx2", "avx2_vnni", "avx512_core", "avx512_core_vnni"]), default=None,
              help="Run as a CPU with no more than this instruction set would (oneDNN's cap: OpenVINO and "
                   "TensorFlow rows only), e.g. avx2 for an AMD EPYC's kernels on an AVX-512 Xeon.")
@DATA_DIR
@click.option("--overwrite", is_flag=True)
@friendly
def bench_compare_cmd(exports, out_dir, rounds, batch_size, threads, runtimes, max_isa, data_dir, overwrite):
  """Benchmark several EXPORTS (e.g. a float model's and its quantization-aware twin's) in one interleaved run:
  whether the others are faster than the first, on this machine, in spite of its drift."""
  from benchmarks.interleaved import compare_exports, markdown  # pylint: disable=import-outside-toplevel

  result = compare_exports(exports, out_dir, rounds=rounds, batch=batch_size, threads=threads, data_dir=data_dir,
                           runtimes=[r.strip() for r in runtimes.split(",") if r.strip()] if runtimes else None,
                           max_isa=max_isa, overwrite=overwrite)
  click.echo(markdown(result))
  click.echo(f"Report: {out_dir}/compare.md")


@click.command("pipeline")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@click.option("--manual-dir", "manual_dirs", multiple=True, type=click.Path(file_okay=False), metavar="[SOURCE=]PATH",
              help="Folder with the upstream COVID-CT files (offline; without it they are downloaded), and "
                   "SOURCE=PATH for each other source to build (cc_ccii, covid_ct_md).")
@SOURCES_ROOT
@click.option("--sources", default=None, metavar="LIST",
              help="Train on these sources' train splits at once, e.g. covid_ct,cc_ccii (default: covid_ct; the "
                   "cross-validated record then no longer applies). Every source built is evaluated.")
@click.option("--slices-per-patient", type=int, default=None,
              help="Keep at most this many training images of each patient (as --sources).")
@DATA_DIR
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=MODEL_OF_RECORD, show_default=True,
              help=f"'{MODEL_OF_RECORD}': the model of record; 'mixed': MobileNetV2 on COVID-CT and CC-CCII; "
                   "'finetune': MobileNetV2 on COVID-CT; 'default': the article's CNN, made to learn; 'article': as "
                   "written.")
@WEIGHTS_DIR
@click.option("--model", default=None, help="Override the recipe's architecture (the cross-validated record then "
                                            "no longer applies: trains on train, threshold chosen on validation).")
@click.option("--epochs", type=int, default=None, callback=positive, help="Override the recipe's epochs (as --model).")
@click.option("--head-epochs", type=int, default=None, help="Override the recipe's head epochs (as --model).")
@click.option("--image-size", type=int, default=None, callback=positive, help="Override the input size (as --model).")
@click.option("--seed", type=int, default=None)
@click.option("--formats", default="all", show_default=True)
@BOOTSTRAP
@click.option("--force-push", is_flag=True, help="Push even if the model is not blessed.")
@friendly
def pipeline_cmd(out_dir, manual_dirs, sources_root, sources, data_dir, recipe, formats, n_boot, force_push,
                 **overrides):
  """The main job: build the dataset, train the model of record, evaluate, export, check parity, bench, push, report."""
  from covidct.dataset import manual_dirs_for, parse_sources  # pylint: disable=import-outside-toplevel
  from covidct.pipeline import run  # pylint: disable=import-outside-toplevel

  trained = parse_sources(sources, allow_all=False) if sources else None
  dirs = manual_dirs_for(manual_dirs, sources_root, need=trained or RECIPES[recipe].sources)
  run(out_dir, data_dir=data_dir, recipe=recipe, overrides=given(sources=trained, **overrides), formats=formats,
      n_boot=n_boot, force_push=force_push, echo=lambda m: click.echo(m, err=True), manual_dirs=dirs)
  click.echo((__import__("pathlib").Path(out_dir) / "report.md").read_text())
