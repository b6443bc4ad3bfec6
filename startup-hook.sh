#!/usr/bin/env bash
# Determined runs this in every container of the experiment before the entrypoint. It installs what
# the cluster image lacks from requirements.txt while keeping the image's own torch, torchvision and
# determined (their CUDA builds match the cluster; reinstalling them would download gigabytes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
constraints="$(mktemp)"
requirements="$(mktemp)"
python3 - "$constraints" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
pins = []
for name in ("torch", "torchvision", "determined"):
    try:
        pins.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
open(sys.argv[1], "w").write("\n".join(pins) + "\n")
PY
grep -v -E '^(torch|torchvision|determined)([=<> ]|$)' requirements.txt > "$requirements"
python3 -m pip install --quiet --disable-pip-version-check -r "$requirements" -c "$constraints"
rm -f "$constraints" "$requirements"
