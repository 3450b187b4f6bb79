#!/usr/bin/env bash
# The vendored crates are crates.io releases plus numbered patches, applied in order:
#   third_party/glommio = glommio 0.9.0 + third_party/glommio-patches/
#   third_party/fred    = fred 10.1.0   + third_party/fred-patches/
# Each tree's PATCHED.md says what each patch does, why, and where it stands against upstream.
#
#   scripts/vendored-patches.sh check    # CI: each vendored tree is exactly its release + series
#   scripts/vendored-patches.sh apply    # rebuild the vendored trees from the releases + series
#
# A release's source comes from cargo's registry cache if it is there, else from
# static.crates.io; either way the .crate file must match the sha256 below. Every patch must
# apply without fuzz (an offset is fine: earlier patches move lines). To change a patch: edit
# the vendored tree, regenerate that patch with `diff -u` against the release plus the patches
# before it, and run `check`.
set -euo pipefail
cd "$(dirname "$0")/.."

# name version sha256 of the published .crate
CRATES=(
  "glommio 0.9.0 e1f8bc1fce949d18098dc0a4e861314e40351a0144ebf61e59bdb5254a2273b2"
  "fred 10.1.0 3a7b2fd0f08b23315c13b6156f971aeedb6f75fb16a29ac1872d2eabccc1490e"
)
# Files in a vendored tree that are not the crate's: the notes on the patches.
OURS=(PATCHED.md)
# Files in a published crate that the vendored tree leaves out: cargo's packaging metadata, and
# fred's Cargo.lock, which its own .gitignore keeps out of git (cargo never reads the lock file
# of a path dependency anyway).
PACKAGING=(.cargo_vcs_info.json Cargo.toml.orig Cargo.lock)

mode="${1:-}"
case "$mode" in
  check | apply) ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac

work=$(mktemp -d /tmp/vendored-patches.XXXXXX)
trap 'rm -rf "$work"' EXIT

# Rebuilds one crate from its release and series in $work, then checks or replaces the tree.
one_crate() {
  local name="$1" version="$2" sha256="$3"
  local vendored="third_party/$name" series="third_party/$name-patches"
  local crate="$work/$name-$version.crate" cached
  cached=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/cache" -name "$name-$version.crate" -print -quit 2>/dev/null || true)
  if [ -n "$cached" ]; then
    cp "$cached" "$crate"
  else
    curl -fsSL --retry 3 -o "$crate" "https://static.crates.io/crates/$name/$name-$version.crate" ||
      { echo "cannot download $name $version from static.crates.io" >&2; exit 1; }
  fi
  echo "$sha256  $crate" | sha256sum -c --quiet - ||
    { echo "$name-$version.crate does not have the sha256 crates.io published" >&2; exit 1; }
  tar -xzf "$crate" -C "$work"
  local tree="$work/$name-$version" file patch output count=0
  for file in "${PACKAGING[@]}"; do rm -f "$tree/$file"; done
  for patch in "$series"/[0-9][0-9][0-9][0-9]-*.patch; do
    if ! output=$(patch -d "$tree" -p1 --fuzz=0 --no-backup-if-mismatch -s <"$patch" 2>&1); then
      echo "$patch does not apply to $name $version plus the patches before it:" >&2
      echo "$output" >&2
      exit 1
    fi
    count=$((count + 1))
  done
  for file in "${OURS[@]}"; do cp "$vendored/$file" "$tree/$file"; done

  case "$mode" in
    check)
      if ! diff -r "$tree" "$vendored" >"$work/difference"; then
        echo "$vendored is not $name $version plus the $count patches of $series:" >&2
        head -60 "$work/difference" >&2
        exit 1
      fi
      echo "ok: $vendored is $name $version plus $count patches"
      ;;
    apply)
      rm -rf "$vendored"
      cp -r "$tree" "$vendored"
      echo "rebuilt $vendored from $name $version and $count patches"
      ;;
  esac
}

for entry in "${CRATES[@]}"; do
  # shellcheck disable=SC2086 # the entry is three words on purpose
  one_crate $entry
done
