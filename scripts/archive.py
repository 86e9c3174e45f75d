"""`dopr archive`: copy the results of run folders (no weights) to a folder small enough to commit."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "archive",
        help="copy run folders' results (configs, metrics, evaluations; no weights, no videos) to commit them",
        description=(
            "Copy what the report, the comparison table and the tuning rule read of each run folder (config.json, "
            "metrics.jsonl, ckpt-*/meta.json and ckpt-*/eval/{results.json,episodes.jsonl,compounding_error.json}) "
            "to OUT/RUN_NAME, leaving out the checkpoints' weights and the videos: kilobytes per run instead of "
            "megabytes. Only finished runs (their final checkpoint evaluated) are archived, so that a commit holds "
            "no half-written run. A long study commits its archive as runs finish, so that its numbers outlive the "
            "machine (`dopr report OUT/*` reads the archive as it reads the runs). Files already archived are "
            "replaced only when they changed; nothing in OUT is deleted."
        ),
    )
    p.add_argument("runs", nargs="+", help="run folders, e.g. out/humanoid/stage1-tune/runs/*; folders training "
                                           "has not written config.json into yet are skipped")
    p.add_argument("--out", required=True, help="archive folder, e.g. docs/results/humanoid/archive/stage1-tune "
                                               "(not one named runs/: git ignores those)")
    p.set_defaults(func=main)


def main(args) -> int:
    import filecmp
    import os
    import shutil
    import sys

    from dopr.atomic import atomic_path
    from dopr.eval.runs import is_run_folder, read_run_record, record_files

    copied = unchanged = runs = unfinished = 0
    for run_dir in args.runs:
        if not is_run_folder(run_dir):
            continue
        try:
            record = read_run_record(run_dir)
        except (ValueError, FileNotFoundError) as err:
            print(f"dopr archive: error: {err}", file=sys.stderr)
            return 2
        if not record.finished:
            unfinished += 1
            continue
        runs += 1
        for name in record_files(record):
            src = os.path.join(run_dir, name)
            dst = os.path.join(args.out, os.path.basename(os.path.normpath(run_dir)), name)
            if os.path.isfile(dst) and filecmp.cmp(src, dst, shallow=False):
                unchanged += 1
                continue
            with atomic_path(dst) as tmp:  # a kill mid-copy leaves the old file, never half of the new one
                shutil.copyfile(src, tmp)
            copied += 1
    if not runs and not unfinished:
        print(f"dopr archive: error: none of the {len(args.runs)} folders is a run folder (no config.json)",
              file=sys.stderr)
        return 2
    print(f"archived {runs} runs to {args.out}: {copied} files copied, {unchanged} unchanged"
          + (f"; {unfinished} not finished (ckpt-final not evaluated, or its evaluation incomplete), left for a "
             "later archive" if unfinished else ""))
    return 0

