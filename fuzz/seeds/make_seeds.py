#!/usr/bin/env python3
"""Writes the checked-in seed corpora: corpus/<target>/seed-<name> for each
seeds/<target>.py that defines a `seeds` dict of name -> bytes. Run from
fuzz/: python3 seeds/make_seeds.py"""

import importlib.util
import pathlib

here = pathlib.Path(__file__).resolve().parent
for script in sorted(here.glob("*.py")):
    if script.name == "make_seeds.py":
        continue
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = here.parent / "corpus" / script.stem
    out.mkdir(parents=True, exist_ok=True)
    for name, data in module.seeds.items():
        (out / f"seed-{name}").write_bytes(data)
        print(f"{out.name}/seed-{name}: {len(data)} bytes")
