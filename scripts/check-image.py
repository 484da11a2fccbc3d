#!/usr/bin/env python3
"""Checks that the Dockerfile's production image holds the production binaries and nothing else.

There is no Docker engine in CI, so the image is checked where it is defined. The production
binaries are the workspace's binaries outside tools/ (DESIGN §2: worker/ and reconciler/; tools/
holds the development and test crates), read from `cargo metadata`, so a new binary lands on the
right side without editing this script. The production image is the Dockerfile's last stage (what
`docker build .` produces) together with the stages it is built FROM. Its COPY instructions must
name exactly the production binaries, each by file name (a copied directory could hold anything),
and come from other stages only (never the build context); ADD is refused. Every development
binary must still be built by some stage (the `dev` target ships them).

    scripts/check-image.py            # exit 0 valid, 1 invalid, 2 could not run
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def binaries() -> tuple[set[str], set[str]]:
    """(production, development) binary names, from cargo metadata."""
    out = subprocess.run(
        ["cargo", "metadata", "--no-deps", "--format-version", "1", "--offline"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    prod, dev = set(), set()
    for pkg in json.loads(out)["packages"]:
        manifest = Path(pkg["manifest_path"]).resolve().relative_to(ROOT)
        for t in pkg["targets"]:
            if "bin" in t["kind"]:
                (dev if manifest.parts[0] == "tools" else prod).add(t["name"])
    return prod, dev


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined, cur = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if cur and s.startswith("#"):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        joined.append(cur + s)
        cur = ""
    if cur:
        joined.append(cur)
    return [(i.split(None, 1)[0].upper(), (i.split(None, 1) + [""])[1]) for i in joined]


def stages(text: str) -> list[dict]:
    result: list[dict] = []
    for op, args in instructions(text):
        if op == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append({"base": words[0], "name": name, "body": []})
        elif result:
            result[-1]["body"].append((op, args))
    return result


def main() -> int:
    try:
        prod, dev = binaries()
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"check-image: cannot read the workspace's binaries: {e}", file=sys.stderr)
        return 2
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    all_stages = stages(text)
    if not all_stages:
        print("check-image: Dockerfile has no FROM", file=sys.stderr)
        return 2
    by_name = {s["name"]: s for s in all_stages if s["name"]}
    problems: list[str] = []

    # The production image: the last stage and the stages of this file it is built on.
    chain, stage = [], all_stages[-1]
    while stage is not None and stage not in chain:
        chain.append(stage)
        stage = by_name.get(stage["base"])
    label = " <- ".join(s["name"] or s["base"] for s in chain)
    copied: list[str] = []
    for s in chain:
        for op, args in s["body"]:
            if op == "ADD":
                problems.append(f"stage {s['name']}: ADD {args} (use COPY --from=STAGE)")
            if op != "COPY":
                continue
            words = shlex.split(args)
            flags = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            if not any(f.startswith("--from=") for f in flags):
                problems.append(f"stage {s['name']}: COPY {args} takes files from the build context")
            for src in paths[:-1]:
                if src.endswith("/") or "*" in src:
                    problems.append(f"stage {s['name']}: COPY of {src}: name each binary, not a "
                                    "directory or pattern")
                copied.append(src.rstrip("/").rsplit("/", 1)[-1])
    if sorted(copied) != sorted(prod):
        problems.append(f"the production image ({label}) copies {sorted(copied)}; the production "
                        f"binaries are {sorted(prod)}")

    built = set()
    for s in all_stages:
        for op, args in s["body"]:
            if op == "RUN":
                built |= set(re.findall(r"--bin\s+([\w-]+)", args))
    for b in sorted((prod | dev) - built):
        problems.append(f"binary {b} is built by no stage (`cargo build --bin {b}`)")
    dev_stages = [s for s in all_stages if s["name"] == "dev"]
    if not dev_stages:
        problems.append("no `dev` stage: the development tools have no image")

    for p in problems:
        print(f"  FAIL  Dockerfile: {p}")
    if problems:
        return 1
    print(f"  ok    Dockerfile: production image ({label}) holds {', '.join(sorted(prod))} only; "
          f"the dev target adds {', '.join(sorted(dev))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
