#!/usr/bin/env bash
# Dependency hygiene, run by scripts/test.sh:
#  1. every dependency in Cargo.toml is used: its crate name appears in the code (a path like
#     `name::`, a `use name`, or a derive/attribute from it), or it is listed in ALLOW_UNUSED with
#     the reason it is needed without being named;
#  2. no crate we depend on directly is in the build at two versions, unless listed in
#     ALLOW_DUPLICATE with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."

# Needed without being named in our code.
ALLOW_UNUSED=(
  "tonic-prost"        # the generated gRPC code (OUT_DIR) uses its codec
  "prost"              # the generated messages derive prost::Message
  "protoc-bin-vendored" # build.rs: protoc without a system install
)
# Deliberately in the build at two versions.
ALLOW_DUPLICATE=(
  "redb"    # redb 2.6 only to upgrade a store written by Corral 0.1 (store/migrate.rs)
  "base64"  # ours (0.22) is tonic's and reqwest's; tokenizers brings 0.13, hyper-util 0.23
  "rand"    # ours (0.8, with rand_distr 0.4, in the simulator); tokenizers brings 0.9
)

deps=$(python3 - <<'EOF'
import tomllib
c = tomllib.load(open("Cargo.toml", "rb"))
names = set()
for table in ("dependencies", "dev-dependencies", "build-dependencies"):
    for k in c.get(table, {}):
        names.add(k)
print("\n".join(sorted(names)))
EOF
)

fail=0
for dep in $deps; do
  for a in "${ALLOW_UNUSED[@]}"; do [ "$dep" = "$a" ] && continue 2; done
  ident="${dep//-/_}"
  if ! grep -rqE "(^|[^A-Za-z0-9_])${ident}(::|[[:space:]]*;|[[:space:]]+as[[:space:]])|extern crate ${ident}" \
      src tests benches examples build.rs 2>/dev/null; then
    echo "unused dependency: $dep (no '${ident}::' in src, tests, benches, examples or build.rs)" >&2
    fail=1
  fi
done

direct=$(echo "$deps" | sed 's/^redb2$/redb/')
# Crates at two or more distinct versions (one version built twice, for a
# build script and for the program, is not a duplicate).
dups=$(cargo tree -d -e normal,build --depth 0 --prefix none 2>/dev/null \
  | grep -E '^[a-z0-9_-]+ v' | awk '{print $1, $2}' | sort -u | awk '{print $1}' | uniq -d)
for d in $dups; do
  echo "$direct" | grep -qx "$d" || continue
  for a in "${ALLOW_DUPLICATE[@]}"; do [ "$d" = "$a" ] && continue 2; done
  echo "duplicate dependency: $d is in the build at several versions:" >&2
  cargo tree -e normal,build -i "$d" --depth 1 2>/dev/null | sed 's/^/  /' >&2 || true
  fail=1
done

if [ "$fail" = 0 ]; then
  echo "dependencies: $(echo "$deps" | wc -l) declared, all used; no unexpected duplicates"
fi
exit "$fail"
