"""``python -m xraylib``: the pipeline's stages from a shell, over the same functions the notebooks call.

Each stage reads the previous stage's files from the output folder, so any stage can be
re-run alone. Errors print one line naming the file or setting and exit with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from . import config, manifest, preprocess, serve, split, synthetic
from .errors import XraylibError


def _add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--paths", metavar="YAML", help="drive_paths.yaml naming the source folders and output_dir")
    parser.add_argument("--output-dir", metavar="DIR", help="output folder (overrides output_dir of --paths)")


def _output_dir(args: argparse.Namespace) -> Path:
    if args.output_dir:
        return Path(args.output_dir).expanduser().resolve()
    if args.paths:
        return config.load_drive_paths(args.paths).output_dir
    raise XraylibError("give --output-dir DIR or --paths drive_paths.yaml")


def _sources(args: argparse.Namespace) -> config.DrivePaths:
    if args.sample:
        out = _output_dir(args)
        _write_sample(config.OutputLayout(out).sample_data, args.n, args.seed)
        return config.sample_drive_paths(out)
    if args.data_root:
        return config.folder_drive_paths(args.data_root, _output_dir(args))
    if args.paths:
        return config.load_drive_paths(args.paths, output_dir=args.output_dir)
    raise XraylibError("name the sources: --paths drive_paths.yaml, --data-root DIR or --sample")


def _write_sample(dest: Path, n: int, seed: int) -> synthetic.SampleData:
    sample = synthetic.write_sample_data(dest, n_patients=n, seed=seed)
    print(f"sample data: {sample.root}")
    return sample


def cmd_sample_data(args: argparse.Namespace) -> None:
    sample = synthetic.write_sample_data(args.dest, n_patients=args.n, seed=args.seed, image_size=args.image_size,
                                         shortcut_marker=args.shortcut_marker)
    print(f"wrote sample data to {sample.root}")
    for key, value in sample.counts.items():
        print(f"  {key}: {value}")


def cmd_manifest(args: argparse.Namespace) -> None:
    paths = _sources(args)
    paths.check_sources_exist()
    views = None if args.views == ["all"] else args.views
    layout = paths.layout
    result = manifest.build_manifest(paths, task=args.task, views=views, workers=args.workers, progress=not args.quiet,
                                     checkpoint=layout.manifest_files)
    manifest.save_manifest(result, layout.manifest, layout.manifest_report)
    print(result.report.summary())
    print(manifest.counts_table(result.frame).to_string(index=False))
    print(f"manifest: {layout.manifest} ({len(result.frame)} images)\nreport:   {layout.manifest_report}")


def cmd_preprocess(args: argparse.Namespace) -> None:
    layout = config.OutputLayout(_output_dir(args))
    frame = manifest.load_manifest(layout.manifest)
    settings = preprocess.PreprocessSettings(image_size=args.image_size, resize=args.resize, intensity=args.intensity,
                                             crop=args.crop)
    data = preprocess.split_and_preprocess(frame, layout.preprocessed, manifest.TASKS[args.task], settings,
                                           fractions=tuple(args.fractions), seed=args.seed,
                                           external_test_sources=args.external_test_source or (),
                                           workers=args.workers, progress=not args.quiet)
    print_preprocess_summary(data)


def print_preprocess_summary(data: preprocess.PreprocessedData) -> None:
    print(split.split_summary(data.manifest).to_string(index=False))
    report, options = data.report, data.settings.describe()
    print(f"preprocessed: {data.folder} ({report.get('cached', 0)} cached, {report.get('new', 0)} new, "
          f"{report.get('skipped', 0)} skipped); images {data.settings.image_size}x{data.settings.image_size} "
          f"uint8, resize={data.settings.resize}{', ' + options if options else ''}, classes {list(data.classes)}")
    for problem in report.get("problems", [])[:5]:
        print(f"  skipped {problem['path']}: {problem['reason']}")


def _weights(value: str | None) -> str | None:
    return None if value in (None, "none", "None", "") else value


def _model_spec(args: argparse.Namespace, data: preprocess.PreprocessedData):
    from . import models

    return models.ModelSpec(backbone=args.backbone, weights=_weights(args.weights), image_size=data.settings.image_size,
                            classes=data.classes, alpha=args.alpha, head_units=args.head_units, dropout=args.dropout,
                            heads=args.heads)


def _train_settings(args: argparse.Namespace):
    from . import train
    from .batches import AugmentSettings

    augment = None if args.no_augment else AugmentSettings(horizontal_flip=args.flip)
    return train.TrainSettings(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                               fine_tune_epochs=args.fine_tune_epochs, fine_tune_learning_rate=args.fine_tune_learning_rate,
                               augment=augment, class_weighting=not args.no_class_weights, seed=args.seed,
                               feature_cache=args.feature_cache, augment_views=args.augment_views,
                               mixed_precision=args.mixed_precision, jit_compile=args.jit_compile,
                               threshold_on=args.threshold_on, strategy=args.strategy)


def _apply_recipe(args: argparse.Namespace, argv: list[str]) -> None:
    """Fill the options of ``--recipe NAME`` that the command line does not give itself."""
    from .train import RECIPES

    if not getattr(args, "recipe", None):
        return
    recipe = RECIPES[args.recipe]
    given = {arg.split("=")[0] for arg in argv if arg.startswith("--")}
    for name, value in {**recipe["spec"], **recipe["settings"]}.items():
        option = "--" + name.replace("_", "-")
        # argparse also takes an unambiguous abbreviation (--epoch for --epochs): that counts as given too.
        if not any(option.startswith(arg) and len(arg) > 2 for arg in given):
            setattr(args, name, value)


def cmd_train(args: argparse.Namespace) -> None:
    from . import runs

    layout = config.OutputLayout(_output_dir(args))
    data = preprocess.load_preprocessed(layout.preprocessed)
    spec = _model_spec(args, data)
    settings = _train_settings(args)
    run_dir = layout.models / args.run
    print(f"training {spec.backbone} (weights={spec.weights}) on {len(data['train'])} images, "
          f"validating on {len(data['val'])}; run folder {run_dir}")
    result = runs.train(data, spec, settings, run_dir=run_dir, resume=args.resume, verbose=2 if args.quiet else "auto")
    _print_train_result(result)


def _print_train_result(result) -> None:
    weights = ", ".join(f"{k}: {v:.2f}" for k, v in result.class_weights.items())
    print(f"class weights (from the training split): {weights or 'off'}")
    if result.resumed_from_epoch:
        print(f"resumed after epoch {result.resumed_from_epoch}")
    last = result.history.iloc[-1] if len(result.history) else None
    if last is not None:
        print(f"epoch {int(last['epoch'])}: loss {last['loss']:.4f}, val_loss {last.get('val_loss', float('nan')):.4f}")
    threshold = json.loads(result.paths.model_json.read_text(encoding="utf-8")).get("threshold", {})
    print(f"threshold {result.threshold:.4f}, chosen on the {threshold.get('chosen_on', 'validation split')}")
    if threshold.get("note"):
        print(f"note: {threshold['note']}")
    print(f"saved: {result.paths.model_keras}, {result.paths.model_h5}, {result.paths.model_weights}, {result.paths.model_json}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from . import runs

    layout = config.OutputLayout(_output_dir(args))
    data = preprocess.load_preprocessed(layout.preprocessed)
    result = runs.evaluate(layout.models / args.run, data, out_dir=layout.reports / args.run,
                           split=args.split, n_boot=args.n_boot, out_of_site=args.out_of_site)
    print(result.evaluation.to_markdown())
    if result.out_of_site is not None:
        print((layout.reports / args.run / "out_of_site.md").read_text(encoding="utf-8"))
    print("written:", ", ".join(str(p) for p in result.files.values()))


def cmd_shortcuts(args: argparse.Namespace) -> None:
    from . import plots, runs, shortcuts

    layout = config.OutputLayout(_output_dir(args))
    data = preprocess.load_preprocessed(layout.preprocessed)
    model_dir = layout.models / args.run
    results = shortcuts.run_shortcut_tests(model_dir, data, model_dir / "shortcut_runs", tests=args.tests,
                                           split=args.split, train_masked=args.train_masked, n_boot=args.n_boot,
                                           verbose=2 if args.quiet else "auto")
    out = layout.reports / args.run
    files = shortcuts.write_shortcut_report(results, out)
    for result in results:
        if isinstance(result, shortcuts.SaliencyResult):
            figure = plots.mean_heatmaps(result.mean_maps, result.lung_mask, result.shares)
            files["heatmaps"] = plots.save_figure(figure, out / "mean_heatmaps.png")
    files["card"] = runs.write_card(model_dir, data=data, shortcut_results=results)
    print(shortcuts.shortcut_report_markdown(results))
    print("written:", ", ".join(str(p) for p in files.values()))


def cmd_predict(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from . import predict

    if args.csv:
        _check_csv_target(Path(args.csv))  # before the predictions are printed, not after
    batches = predict.iter_predictions(args.model, args.images if len(args.images) > 1 else args.images[0],
                                       site=args.site, data_dir=args.data)
    # A batch of files at a time: its lines printed and its rows written to --csv before the next batch is read.
    with _PredictionsCsv(Path(args.csv)) if args.csv else contextlib.nullcontext() as csv_out:
        announced = False
        for frame in batches:
            if len(frame) and not announced:
                whose = f"site profile {args.site!r}" if args.site else "the model's own"
                print(f"decisions at threshold {frame['threshold'].iloc[0]:.4f} ({whose})")
                announced = True
            with tqdm.external_write_mode():  # above the progress bar (shown for more than a batch of files)
                _print_predictions(frame)
            if csv_out is not None:
                csv_out.write(frame)
    if args.csv:
        print(f"wrote {args.csv}")


def _is_stream(path: Path) -> bool:
    """Whether ``path`` is a character device, a FIFO or under ``/dev`` (``/dev/stdout``, a pipe): written straight
    (appended: ``/dev/stdout`` may be a file the shell redirected to), never replaced by a new file."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or path.absolute().parts[:2] == ("/", "dev")


def _check_csv_target(path: Path) -> None:
    """:class:`WriteError` when ``--csv`` cannot be written: a folder, another non-file, a parent that is a file or
    not writable. A full disk shows only when writing (:func:`_write_predictions_csv`)."""
    import os

    from .fileio import WriteError

    if path.is_dir():
        raise WriteError(path, f"--csv names a folder; name a file, such as {path / 'predictions.csv'}")
    if path.exists() and not path.is_file() and not _is_stream(path):
        raise WriteError(path, "--csv names something that is not a file (a socket?); name a file")
    parent = next((p for p in (path.absolute().parent, *path.absolute().parent.parents) if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise WriteError(path, f"{parent} is a file, not a folder")
    if parent is not None and not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise WriteError(path, f"no permission to write in {parent}: write elsewhere")


def _write_predictions_csv(path: Path, frame) -> None:
    """The predictions as CSV at ``path``: a file written atomically, a device or FIFO straight; one
    :class:`WriteError` naming ``path`` on a full disk or any other write failure."""
    with _PredictionsCsv(path) as out:
        out.write(frame)


class _PredictionsCsv:
    """``--csv`` written as the predictions come: each batch's rows (the header once) appended to a temporary file
    beside ``path`` that replaces it at the end (:func:`xraylib.fileio.atomic_path`: an interrupted run leaves the old
    file, or none); a device or FIFO (``/dev/stdout``) written straight. A write failure is one :class:`WriteError`
    naming ``path``; a failure of the predictions themselves passes through unchanged."""

    def __init__(self, path: Path):
        self.path = path
        self._stack = contextlib.ExitStack()
        self._file = None
        self._header = True

    def __enter__(self) -> "_PredictionsCsv":
        from .fileio import atomic_path

        with self._errors():
            if _is_stream(self.path):
                self._file = self._stack.enter_context(open(self.path, "a", newline=""))
            else:
                self._file = self._stack.enter_context(open(self._stack.enter_context(atomic_path(self.path)), "w",
                                                            newline=""))
        return self

    def write(self, frame) -> None:
        with self._errors():
            frame.to_csv(self._file, index=False, header=self._header)
            self._file.flush()  # the rows are in the file before the next batch is read
        self._header = False

    def __exit__(self, *exc_info) -> bool:
        if exc_info[0] is not None:  # the temporary file is removed; the error that stopped the run is the one told
            with contextlib.suppress(OSError):  # (closing after a failed write fails again)
                self._stack.__exit__(*exc_info)
            return False
        with self._errors():
            self._stack.close()  # closed and renamed onto the path
        return False

    @contextlib.contextmanager
    def _errors(self):
        from .fileio import WriteError, write_error

        try:
            yield
        except OSError as exc:
            if isinstance(exc, WriteError) and exc.reason.endswith("were not saved"):
                raise
            error = write_error(self.path, exc)
            if not isinstance(error, WriteError):
                error = WriteError(self.path, f"cannot be written ({exc.strerror or exc})", exc.errno)
            raise WriteError(error.path, f"{error.reason}; the predictions above were not saved", error.errno) from None


def _print_predictions(frame) -> None:
    prob_columns = [c for c in frame.columns if c.startswith("prob_")]
    for row in frame.itertuples(index=False):
        row = row._asdict()
        if not row["ok"]:
            print(f"  {row['path']}: skipped ({row['error']})")
            continue
        probs = ", ".join(f"{c[5:]} {row[c]:.3f}" for c in prob_columns)
        if not row.get("judgeable", True):  # the out-of-distribution guard flagged it: no decision
            print(f"  {row['path']}: no decision, not a chest X-ray this model can judge ({row['ood_reason']})  "
                  f"({probs})")
            continue
        print(f"  {row['path']}: {row['decision']}  ({probs}; threshold {row['threshold']:.3f})")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from . import calibrate

    result = calibrate.calibrate(args.model, args.normals if len(args.normals) > 1 else args.normals[0], args.site,
                                 positives=(args.positives if len(args.positives) > 1 else args.positives[0])
                                 if args.positives else None,
                                 target_specificity=args.target_specificity, target_sensitivity=args.target_sensitivity,
                                 data_dir=args.data)
    print(result.text())
    print(f"saved site profile {result.site!r} in the model's model.json (its own threshold kept); use it with "
          f"`python -m xraylib predict --model {args.model} --site {result.site!r} IMAGES` or `serve --site`")


def cmd_audit(args: argparse.Namespace) -> None:
    from . import audit

    layout = config.OutputLayout(_output_dir(args))
    frame = manifest.load_manifest(layout.manifest)
    has_cache = (layout.preprocessed / "preprocess.json").exists() and not args.no_pixels
    data = preprocess.load_preprocessed(layout.preprocessed) if has_cache else None
    report = audit.audit(None if data is not None else frame, data, classes=manifest.TASKS[args.task],
                         progress=not args.quiet)
    files = audit.write_audit(report, layout.reports)
    print(report.to_markdown())
    print(f"{len(report.warnings)} warning(s); written: {files['md']}, {files['json']}")
    if not has_cache:
        print("pixel checks (borders, burned-in marks, near-duplicates) need the preprocessed arrays: run preprocess first")


def cmd_demo(args: argparse.Namespace) -> None:
    from . import predict, runs

    out = Path(args.output_dir).expanduser().resolve()
    layout = config.OutputLayout(out)
    print("xraylib demo on the built-in synthetic sample data")
    print("(research software, not a diagnostic device; synthetic images, so the numbers say the code works, "
          "not that a model can diagnose anything)\n")
    print("1/5 sample data")
    _write_sample(layout.sample_data, args.n, args.seed)
    paths = config.sample_drive_paths(out)
    print("\n2/5 manifest (notebook 01)")
    result = manifest.build_manifest(paths, task=args.task, progress=not args.quiet)
    manifest.save_manifest(result, layout.manifest, layout.manifest_report)
    print(result.report.summary())
    print("\n3/5 patient-level split and preprocessing (notebook 02)")
    settings = preprocess.PreprocessSettings(image_size=args.image_size)
    data = preprocess.split_and_preprocess(result.frame, layout.preprocessed, manifest.TASKS[args.task], settings,
                                           fractions=(0.6, 0.2, 0.2), seed=args.seed, progress=not args.quiet)
    print_preprocess_summary(data)
    print(f"\n4/5 training (notebook 03): {args.backbone}, {args.epochs} epochs")
    spec = _model_spec(args, data)
    trained = runs.train(data, spec, _train_settings(args), run_dir=layout.models / args.run, resume=True,
                          verbose=2 if args.quiet else "auto")
    _print_train_result(trained)
    print("\n5/5 evaluation on the held-out test patients (notebook 04) and predictions (notebook 05)")
    evaluation = runs.evaluate(layout.models / args.run, data, out_dir=layout.reports / args.run, n_boot=args.n_boot)
    ev = evaluation.evaluation
    print(f"test set: {ev.n_patients} patients, {ev.n_images} images; threshold {float(ev.threshold):.3f} "
          f"({ev.threshold_chosen_by})")
    table = ev.metrics_table()
    for metric, row in table.iterrows():
        print(f"  {metric:12s} {row['value']:.3f}  (95% CI {row['low']:.3f} to {row['high']:.3f}; "
              f"{int(row['numerator'])}/{int(row['denominator'])})")
    for warning in ev.warnings:
        print(f"  warning: {warning}")
    examples = _demo_examples(data)
    print("predictions for a few sample files, preprocessed from the model's JSON:")
    _print_predictions(predict.predict_files(layout.models / args.run, examples))
    print("\nfiles:")
    print(f"  model:   {trained.paths.model_keras}\n           {trained.paths.model_h5}\n           {trained.paths.model_weights}"
          f"\n           {trained.paths.model_json}")
    print(f"  report:  {evaluation.files['md']}\n           {evaluation.files['json']}")
    print("  plots:   " + "\n           ".join(str(p) for k, p in evaluation.files.items() if k.endswith(".png")))
    print("\nnext: open notebooks/01_dataset_creation.ipynb, try `python -m xraylib predict --model "
          f"{trained.paths.root} YOUR_IMAGES`, or the web page: `python -m xraylib serve --model {trained.paths.root}`")


def _demo_examples(data: preprocess.PreprocessedData) -> list[str]:
    """One test image per class and format (PNG/JPEG/DICOM) where there is one."""
    test = data["test"].manifest
    picks = test.groupby(["label", "file_format"], sort=True).head(1)
    return picks["path"].head(5).tolist()


def _add_training_options(p: argparse.ArgumentParser, backbone: str = "vgg16", weights: str = "imagenet",
                          epochs: int = 25) -> None:
    from .preprocess import NORMALISATION

    p.add_argument("--run", default="run", help="run name: files go to OUTPUT_DIR/models/RUN (default run)")
    p.add_argument("--recipe", choices=["seeds", "recommended"], default=None,
                   help="a named recipe (README, 'Recipes'): recommended = MobileNet 0.25 on ImageNet weights, "
                        "4 augmented views, threshold chosen on out-of-site predictions; options given on the command "
                        "line override it")
    p.add_argument("--backbone", choices=sorted(NORMALISATION), default=backbone,
                   help=f"model: vgg16 (the seeds'), resnet50, densenet121, mobilenet_v2, mobilenet, small_cnn (default {backbone})")
    p.add_argument("--weights", default=weights,
                   help="imagenet (downloaded by Keras; needs internet), none (random), or a local .h5 weights file "
                        f"for the backbone without its top (default {weights})")
    p.add_argument("--alpha", type=float, default=None, help="MobileNet width multiplier, e.g. 0.25")
    p.add_argument("--head-units", type=int, default=64, help="units of the head's dense layer (default 64)")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout before the softmax (default 0.5)")
    p.add_argument("--heads", type=int, default=1, metavar="K",
                   help="an ensemble of K heads on the frozen backbone, each trained on its own, their probabilities "
                        "averaged (default 1; needs the feature cache and no fine-tuning)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"epochs with the backbone frozen (default {epochs})")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default 8, the seeds')")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--fine-tune-epochs", type=int, default=0,
                   help="extra epochs with the backbone's top block unfrozen (default 0: no fine-tuning)")
    p.add_argument("--fine-tune-learning-rate", type=float, default=1e-5, help="learning rate for fine-tuning (default 1e-5)")
    p.add_argument("--no-augment", action="store_true", help="turn off augmentation (rotation, shift, zoom, brightness)")
    p.add_argument("--flip", action="store_true",
                   help="add horizontal flips (off by default: a chest X-ray is not left-right symmetric)")
    p.add_argument("--no-class-weights", action="store_true", help="do not weight classes by their frequency")
    p.add_argument("--feature-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="with the backbone frozen, run it once per image and train the head on features cached next "
                        "to the preprocessed arrays (default); --no-feature-cache runs it on every image every epoch "
                        "(fresh augmentation)")
    p.add_argument("--augment-views", type=int, default=1, metavar="K",
                   help="with augmentation and the feature cache: views cached per training image (default 1: plain "
                        "images only, no augmentation while the backbone is frozen; K costs K backbone passes, once)")
    p.add_argument("--mixed-precision", choices=["auto", "on", "off", "bfloat16"], default="auto",
                   help="auto (default): float16 on a GPU of compute capability >= 7.0 (Colab's T4); on a CPU with "
                        "bfloat16 units (AMX, AVX512-BF16) bfloat16 for a frozen VGG16, else float32; on: float16; "
                        "bfloat16; off: float32")
    p.add_argument("--jit-compile", choices=["auto", "on", "off"], default="auto",
                   help="XLA: auto (default) uses it on a GPU only (slower on a CPU)")
    p.add_argument("--strategy", choices=["auto", "one", "mirrored", "tpu", "multi-worker"], default="auto",
                   help="where training runs: auto (default: Colab's TPU, several GPUs, else one device), one, mirrored "
                        "(all GPUs of this machine), tpu, multi-worker (the machines in TF_CONFIG; README: Strategies); "
                        "--batch-size stays the global batch")
    p.add_argument("--threshold-on", choices=["validation", "out_of_site"], default="validation",
                   help="where the decision threshold is chosen: the validation split (default, the seeds' way) or the "
                        "pooled predictions of the out-of-site estimate (sites held out whole; README)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default 42)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m xraylib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sample-data", help="write the built-in synthetic sample data in the real source layouts")
    p.add_argument("dest", help="folder to create (must be new or earlier sample data)")
    p.add_argument("--n", type=int, default=30, help="patients per source (default 30)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same bytes (default 0)")
    p.add_argument("--image-size", type=int, default=320, help="typical image side in pixels (default 320)")
    p.add_argument("--shortcut-marker", choices=synthetic.LABELS, default=None,
                   help="burn a marker into every image of this class (a deliberate shortcut, for shortcut tests)")
    p.set_defaults(func=cmd_sample_data)

    p = sub.add_parser("manifest", help="build manifest.csv from the sources (notebook 01)")
    _add_output(p)
    p.add_argument("--data-root", metavar="DIR", help="a folder with the sources under their usual names (like ../shared/data)")
    p.add_argument("--sample", action="store_true", help="use (and write if missing) the built-in sample data")
    p.add_argument("--n", type=int, default=30, help="with --sample: patients per source")
    p.add_argument("--seed", type=int, default=0, help="with --sample: random seed")
    p.add_argument("--task", choices=sorted(manifest.TASKS), default="covid_vs_normal", help="classes to keep")
    p.add_argument("--views", nargs="+", default=list(manifest.DEFAULT_VIEWS),
                   help="views to keep, e.g. PA AP 'AP Supine' L, or 'all' (default: PA AP 'AP Supine')")
    p.add_argument("--workers", type=int, default=8, help="parallel file readers (default 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("preprocess", help="split by patient and cache resized uint8 arrays (notebook 02)")
    _add_output(p)
    p.add_argument("--task", choices=sorted(manifest.TASKS), default="covid_vs_normal", help="classes (and their order)")
    p.add_argument("--image-size", type=int, default=224, help="output side in pixels (default 224)")
    p.add_argument("--resize", choices=preprocess.RESIZE_MODES, default="stretch",
                   help="stretch (the seeds' way) or pad (keep the aspect ratio)")
    p.add_argument("--intensity", choices=preprocess.INTENSITY_MODES, default="none",
                   help="grey levels: none (as decoded, default), equalize (histogram equalisation) or clahe "
                        "(adaptive, contrast-limited); saved with the model and applied at prediction")
    p.add_argument("--crop", choices=preprocess.CROP_MODES, default="none",
                   help="none (default) or body (cut uniform borders, frames and burned-in text at the edges)")
    p.add_argument("--fractions", type=float, nargs=3, default=[0.7, 0.15, 0.15], metavar=("TRAIN", "VAL", "TEST"),
                   help="patient fractions per split (default 0.7 0.15 0.15)")
    p.add_argument("--seed", type=int, default=42, help="split seed (default 42)")
    p.add_argument("--external-test-source", nargs="*", metavar="SOURCE",
                   help="sources held out whole as the test set (e.g. nih)")
    p.add_argument("--workers", type=int, default=None, help="decoding threads, worker processes from 10,000 files (default: CPU cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("audit", help="audit the data set for confounds before training (counts, ages, views, marks, duplicates)")
    _add_output(p)
    p.add_argument("--task", choices=sorted(manifest.TASKS), default="covid_vs_normal", help="classes (and their order)")
    p.add_argument("--no-pixels", action="store_true", help="metadata checks only, even when preprocessed arrays exist")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("train", help="train a model on the preprocessed arrays (notebook 03)")
    _add_output(p)
    _add_training_options(p)
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue an interrupted run at its next epoch with its optimizer state (default); "
                        "--no-resume starts the run over")
    p.add_argument("--quiet", action="store_true", help="one line per epoch instead of progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a trained model on the held-out test split (notebook 04)")
    _add_output(p)
    p.add_argument("--run", default="run", help="run name: the model is read from OUTPUT_DIR/models/RUN (default run)")
    p.add_argument("--split", default="test", choices=["test", "val"], help="split to evaluate (default test)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (default 1000)")
    p.add_argument("--out-of-site", action=argparse.BooleanOptionalAction, default=True,
                   help="also estimate what to expect in a hospital the model never saw, by holding out whole sites "
                        "(default; seconds per fold on cached features)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("shortcuts", help="shortcut tests of a trained model: source prediction, lungs hidden, "
                                         "leave one source out, Grad-CAM heat (notebook 04)")
    _add_output(p)
    p.add_argument("--run", default="run", help="run name: the model is read from OUTPUT_DIR/models/RUN (default run)")
    p.add_argument("--tests", nargs="+", choices=["source", "lungs", "loso", "saliency"],
                   default=["source", "lungs", "loso", "saliency"],
                   help="which tests (default all four; source and loso retrain the pipeline)")
    p.add_argument("--split", default="test", choices=["test", "val"], help="split to test on (default test)")
    p.add_argument("--train-masked", action="store_true",
                   help="lungs hidden: also train and test a model that never sees the lungs")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (default 1000)")
    p.add_argument("--quiet", action="store_true", help="one line per epoch instead of progress bars")
    p.set_defaults(func=cmd_shortcuts)

    p = sub.add_parser("predict", help="predict your own PNG/JPEG/DICOM files with a trained model (notebook 05)")
    p.add_argument("--model", required=True, help="a run folder (OUTPUT_DIR/models/RUN), model.keras or model.h5")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--csv", help="also write the predictions to this CSV file")
    p.add_argument("--site", metavar="NAME", default=None,
                   help="decide at this site profile's threshold (made by `calibrate`) instead of the model's own")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="the preprocessed data the model was trained on (OUTPUT_DIR/preprocessed), for the "
                        "out-of-distribution check when the model has no reference beside it")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("calibrate", help="set a threshold for your own site from its images known to be normal "
                                         "(and known positives), stored as a named site profile in model.json")
    p.add_argument("--model", required=True, help="a run folder (OUTPUT_DIR/models/RUN), model.keras or model.h5")
    p.add_argument("--normals", required=True, nargs="+", metavar="PATH",
                   help="images of your site known to be normal: files or folders (a few dozen at least)")
    p.add_argument("--positives", nargs="+", metavar="PATH", default=None,
                   help="optional: images of your site known to be positive (needed for --target-sensitivity)")
    p.add_argument("--site", required=True, metavar="NAME", help="the site profile's name, e.g. 'st-elsewhere'")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-specificity", type=float, metavar="S",
                        help="share of the site's normals to call normal, e.g. 0.9")
    target.add_argument("--target-sensitivity", type=float, metavar="R",
                        help="share of the site's positives to call positive, e.g. 0.9 (needs --positives)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="the preprocessed data the model was trained on (OUTPUT_DIR/preprocessed), for the "
                        "out-of-distribution check when the model has no reference beside it")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("serve", help="a local web page (and JSON API) to check your own images with a trained model")
    serve.add_arguments(p)
    p.set_defaults(func=serve.cmd_serve)

    p = sub.add_parser("demo", help="the main job on the built-in sample data, end to end")
    p.add_argument("--output-dir", default="outputs/demo", help="where everything is written (default outputs/demo)")
    p.add_argument("--n", type=int, default=60, help="patients per source in the sample data (default 60)")
    p.add_argument("--task", choices=sorted(manifest.TASKS), default="covid_vs_normal", help="classes")
    p.add_argument("--image-size", type=int, default=128, help="model input side in pixels (default 128)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_training_options(p, backbone="small_cnn", weights="none", epochs=30)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _apply_recipe(args, list(sys.argv[1:] if argv is None else argv))
    try:
        args.func(args)
    except XraylibError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0
