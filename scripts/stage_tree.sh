#!/usr/bin/env bash
# Copies the source tree (tracked + untracked-not-ignored files) to $1, so that a build with another torch
# or configuration does not disturb the in-place development build.
set -euo pipefail
dest=$1
rm -rf "$dest"
mkdir -p "$dest"
git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C "$dest"
