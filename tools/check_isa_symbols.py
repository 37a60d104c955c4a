#!/usr/bin/env python3
"""Fail if a per-ISA kernel object defines a weak (COMDAT) symbol outside its ISA namespace.

The same kernel sources are compiled once per ISA with different -m flags. An inline function
or template instantiated in several of those objects becomes a weak symbol, and the linker
keeps ONE copy for the whole module: possibly the AVX-512 one, which then runs (and crashes)
on a CPU without AVX-512. Keeping every inline helper inside `attnkit::cpu::<isa>` gives each
variant its own copy. This check (run after every build) proves that no weak symbol escapes.
"""
import argparse
import subprocess
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nm", default="nm")
    ap.add_argument("--namespace", required=True)
    ap.add_argument("objects", nargs="+")
    args = ap.parse_args()
    prefix = f"attnkit::cpu::{args.namespace}::"
    bad = []
    for obj in args.objects:
        out = subprocess.run([args.nm, "-C", "--defined-only", obj], capture_output=True,
                             text=True, check=True).stdout
        for line in out.splitlines():
            parts = line.split(None, 2)
            if len(parts) < 3:
                continue
            kind, name = parts[1], parts[2]
            if kind not in ("W", "V", "u"):
                continue
            # Guard variables, vtables and typeinfo of our own inline code carry the namespace
            # inside the demangled name as well.
            if prefix in name:
                continue
            # Data, not code: the exception-personality pointer every C++ object refers to.
            if name.startswith("DW.ref."):
                continue
            bad.append(f"{obj}: {kind} {name}")
    if bad:
        print(f"check_isa_symbols: weak symbols outside {prefix} (ODR hazard between ISA "
              "variants; move the code into the ISA namespace or out of the kernel objects):",
              file=sys.stderr)
        for b in bad[:50]:
            print("  " + b, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
