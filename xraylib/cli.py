"""``python -m xraylib``: the pipeline's stages from a shell, over the same functions the notebooks call.

Each stage reads the previous stage's files from the output folder, so any stage can be
re-run alone. Errors print one line naming the file or setting and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import config, manifest, preprocess, split, synthetic
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
    result = manifest.build_manifest(paths, task=args.task, views=views, workers=args.workers, progress=not args.quiet)
    layout = paths.layout
    manifest.save_manifest(result, layout.manifest, layout.manifest_report)
    print(result.report.summary())
    print(manifest.counts_table(result.frame).to_string(index=False))
    print(f"manifest: {layout.manifest} ({len(result.frame)} images)\nreport:   {layout.manifest_report}")


def cmd_preprocess(args: argparse.Namespace) -> None:
    layout = config.OutputLayout(_output_dir(args))
    frame = manifest.load_manifest(layout.manifest)
    settings = preprocess.PreprocessSettings(image_size=args.image_size, resize=args.resize)
    data = preprocess.split_and_preprocess(frame, layout.preprocessed, manifest.TASKS[args.task], settings,
                                           fractions=tuple(args.fractions), seed=args.seed,
                                           external_test_sources=args.external_test_source or (),
                                           workers=args.workers, progress=not args.quiet)
    print_preprocess_summary(data)


def print_preprocess_summary(data: preprocess.PreprocessedData) -> None:
    print(split.split_summary(data.manifest).to_string(index=False))
    report = data.report
    print(f"preprocessed: {data.folder} ({report.get('cached', 0)} cached, {report.get('new', 0)} new, "
          f"{report.get('skipped', 0)} skipped); images {data.settings.image_size}x{data.settings.image_size} "
          f"uint8, resize={data.settings.resize}, classes {list(data.classes)}")
    for problem in report.get("problems", [])[:5]:
        print(f"  skipped {problem['path']}: {problem['reason']}")


def cmd_demo(args: argparse.Namespace) -> None:
    out = Path(args.output_dir).expanduser().resolve()
    layout = config.OutputLayout(out)
    print("xraylib demo on the built-in synthetic sample data (research software, not a diagnostic device)\n")
    _write_sample(layout.sample_data, args.n, args.seed)
    paths = config.sample_drive_paths(out)
    result = manifest.build_manifest(paths, task=args.task, progress=not args.quiet)
    manifest.save_manifest(result, layout.manifest, layout.manifest_report)
    print(result.report.summary())
    settings = preprocess.PreprocessSettings(image_size=args.image_size)
    data = preprocess.split_and_preprocess(result.frame, layout.preprocessed, manifest.TASKS[args.task], settings,
                                           fractions=(0.6, 0.2, 0.2), seed=args.seed, progress=not args.quiet)
    print_preprocess_summary(data)
    print(f"\ndone: manifest {layout.manifest}, preprocessed arrays {layout.preprocessed}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m xraylib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sample-data", help="write the built-in synthetic sample data in the three source layouts")
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
    p.add_argument("--fractions", type=float, nargs=3, default=[0.7, 0.15, 0.15], metavar=("TRAIN", "VAL", "TEST"),
                   help="patient fractions per split (default 0.7 0.15 0.15)")
    p.add_argument("--seed", type=int, default=42, help="split seed (default 42)")
    p.add_argument("--external-test-source", nargs="*", metavar="SOURCE",
                   help="sources held out whole as the test set (e.g. nih)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPU cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("demo", help="the main job on the built-in sample data, end to end")
    p.add_argument("--output-dir", default="outputs/demo", help="where everything is written (default outputs/demo)")
    p.add_argument("--n", type=int, default=30, help="patients per source in the sample data (default 30)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--task", choices=sorted(manifest.TASKS), default="covid_vs_normal", help="classes")
    p.add_argument("--image-size", type=int, default=224, help="model input side in pixels (default 224)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except XraylibError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0
