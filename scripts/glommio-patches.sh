#!/usr/bin/env bash
# The vendored glommio is crates.io's glommio 0.9.0 plus the numbered patches in
# third_party/glommio-patches/, applied in order (third_party/glommio/PATCHED.md says what
# each one does, why, and where it stands against upstream).
#
#   scripts/glommio-patches.sh check    # CI: the vendored tree is exactly 0.9.0 + the series
#   scripts/glommio-patches.sh apply    # rebuild third_party/glommio from 0.9.0 + the series
#
# The 0.9.0 source comes from cargo's registry cache if it is there, else from
# static.crates.io; either way the .crate file must match the sha256 below. Every patch must
# apply without fuzz (an offset is fine: earlier patches move lines). To change a patch: edit
# the vendored tree, regenerate that patch with `diff -u` against 0.9.0 plus the patches before
# it, and run `check`.
set -euo pipefail
cd "$(dirname "$0")/.."

CRATE_SHA256=e1f8bc1fce949d18098dc0a4e861314e40351a0144ebf61e59bdb5254a2273b2
VENDORED=third_party/glommio
SERIES=third_party/glommio-patches
# Files in the vendored tree that are not glommio's: the notes on the patches.
OURS=(PATCHED.md)
# Files in the published crate that the vendored tree leaves out: cargo's packaging metadata.
PACKAGING=(.cargo_vcs_info.json Cargo.toml.orig)

mode="${1:-}"
case "$mode" in
  check | apply) ;;
  *) sed -n '2,13p' "$0"; exit 2 ;;
esac

work=$(mktemp -d /tmp/glommio-patches.XXXXXX)
trap 'rm -rf "$work"' EXIT

crate="$work/glommio-0.9.0.crate"
cached=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/cache" -name glommio-0.9.0.crate -print -quit 2>/dev/null || true)
if [ -n "$cached" ]; then
  cp "$cached" "$crate"
else
  curl -fsSL --retry 3 -o "$crate" https://static.crates.io/crates/glommio/glommio-0.9.0.crate ||
    { echo "cannot download glommio 0.9.0 from static.crates.io" >&2; exit 1; }
fi
echo "$CRATE_SHA256  $crate" | sha256sum -c --quiet - ||
  { echo "glommio-0.9.0.crate does not have the sha256 crates.io published" >&2; exit 1; }
tar -xzf "$crate" -C "$work"
tree="$work/glommio-0.9.0"
for file in "${PACKAGING[@]}"; do rm -f "$tree/$file"; done

count=0
for patch in "$SERIES"/[0-9][0-9][0-9][0-9]-*.patch; do
  if ! output=$(patch -d "$tree" -p1 --fuzz=0 --no-backup-if-mismatch -s <"$patch" 2>&1); then
    echo "$patch does not apply to 0.9.0 plus the patches before it:" >&2
    echo "$output" >&2
    exit 1
  fi
  count=$((count + 1))
done
for file in "${OURS[@]}"; do cp "$VENDORED/$file" "$tree/$file"; done

case "$mode" in
  check)
    if ! diff -r "$tree" "$VENDORED" >"$work/difference"; then
      echo "third_party/glommio is not glommio 0.9.0 plus the $count patches of $SERIES:" >&2
      head -60 "$work/difference" >&2
      exit 1
    fi
    echo "ok: third_party/glommio is glommio 0.9.0 plus $count patches"
    ;;
  apply)
    rm -rf "$VENDORED"
    cp -r "$tree" "$VENDORED"
    echo "rebuilt third_party/glommio from glommio 0.9.0 and $count patches"
    ;;
esac
