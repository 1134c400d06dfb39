#!/usr/bin/env python3
"""The proc-macro list of Cargo.toml's `[profile.dev.package]` table, from `cargo metadata`.

Proc macros, and the crates only they use, run inside the compiler: the workspace's
`[profile.dev.package."*"] opt-level = 3` would optimise them too (a package override
outranks `build-override`), so the table names each of them at opt-level 0. A package
is listed when it is a proc macro or is reachable from one through normal
dependencies, and no workspace crate reaches it without passing through a proc macro
or a build script (those others are compiled into tests and binaries, and stay
optimised; build scripts' own dependencies are left at 3 too: seconds).

    python3 scripts/dev-macros.py          prints the table's lines
    python3 scripts/dev-macros.py --check  exits 1, with the lines to write, when
                                           Cargo.toml's table differs

Run it after adding or upgrading a dependency. It resolves for this machine's host
target (the list is the Linux one where CI runs).
"""
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def host_target():
    out = subprocess.run(["rustc", "-vV"], check=True, capture_output=True, text=True).stdout
    return next(l.split(": ", 1)[1] for l in out.splitlines() if l.startswith("host: "))


def wanted():
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked",
             "--filter-platform", host_target()],
            cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout
    )
    pkgs = {p["id"]: p for p in meta["packages"]}
    macro = {i for i, p in pkgs.items()
             if any("proc-macro" in t["kind"] for t in p["targets"])}
    # Normal (and, from workspace crates, dev) dependencies of each package.
    deps = {}
    for node in meta["resolve"]["nodes"]:
        deps[node["id"]] = [
            (d["pkg"], {k["kind"] for k in d["dep_kinds"]}) for d in node["deps"]
        ]

    def walk(starts, kinds, stop):
        seen, todo = set(), list(starts)
        while todo:
            i = todo.pop()
            if i in seen:
                continue
            seen.add(i)
            if i in stop:
                continue
            for d, ks in deps.get(i, []):
                if ks & kinds:
                    todo.append(d)
        return seen

    members = set(meta["workspace_members"])
    # Compiled into the workspace's own code: reached without a proc macro between.
    target_side = walk(members, {None, "dev"}, macro)
    host_side = walk(macro, {None}, set())
    names = sorted({pkgs[i]["name"] for i in host_side - (target_side - macro) - members})
    return names


def current():
    text = (ROOT / "Cargo.toml").read_text()
    table = re.search(r"^\[profile\.dev\.package\]\n((?:[^\[\n].*\n)*)", text, re.M)
    if not table:
        return []
    return sorted(re.findall(r"^([A-Za-z0-9_-]+) = \{ opt-level = 0 \}$", table.group(1), re.M))


def main():
    want = wanted()
    lines = [f"{n} = {{ opt-level = 0 }}" for n in want]
    if "--check" in sys.argv[1:]:
        have = current()
        if have == want:
            return 0
        print("Cargo.toml's [profile.dev.package] proc-macro list is out of date:", file=sys.stderr)
        for n in sorted(set(want) - set(have)):
            print(f"  missing: {n}", file=sys.stderr)
        for n in sorted(set(have) - set(want)):
            print(f"  not a proc macro's alone any more: {n}", file=sys.stderr)
        print("write these lines under [profile.dev.package] "
              "(python3 scripts/dev-macros.py prints them):", file=sys.stderr)
        print("\n".join(lines), file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
