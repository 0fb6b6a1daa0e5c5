#!/usr/bin/env bash
# Mutation testing of the security-critical code with cargo-mutants: every mutant of
# these files must be caught by its crate's tests, or be listed, with the reason it
# cannot be caught, in scripts/mutants-equivalent.txt. Fails on any other missed or
# timed-out mutant, and on a listed one that no longer exists (so the list stays true).
#
# Usage: scripts/mutants.sh [fast|all|GROUP...]
#   fast: the TLS binding and sealed envelopes (group crypto; about 5 minutes).
#   all:  every group: crypto; discovery (records and the server's request
#         verification, ~25 minutes); keyfile; wire (the frame codec, against the node
#         crate's unit tests); inbound (the node's accepting side, against the
#         end-to-end tests of nodes in tests/: node_messaging, adversarial and relay). Each
#         node mutant rebuilds the node: about 45 s each on 2 cores, 1.5 hours for both.
# MUTANTS_ONLY=REGEX tests only the mutants of the groups' files whose names match
# (e.g. one file, or the functions just changed); the check for stale list entries is
# skipped then.
# cargo-mutants mutates a copy of the tree in a temporary directory, never the sources
# here; the copies build into target/mutants/build, which is deleted at the end, or into
# MUTANTS_TARGET_DIR when that is set (kept).
# Needs cargo-mutants 27 (`cargo install cargo-mutants --version '^27' --locked`).
# Results: target/mutants/<group>/mutants.out/{caught,missed,timeout,unviable}.txt
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- fast

# group | package mutated | files | package whose tests run | test arguments (after `--`)
all_groups=(
  "crypto|p2p-crypto|crypto/src/tls.rs crypto/src/seal.rs|p2p-crypto|"
  "discovery|p2p-discovery|discovery/src/record.rs discovery/src/server.rs discovery/src/store/local.rs|p2p-discovery|--lib --test router --test slow_clients --test proptest_records --test client"
  "keyfile|p2p-crypto|crypto/src/keyfile.rs|p2p-crypto|"
  "wire|p2p-node|node/src/wire.rs|p2p-node|--lib"
  # The one test of adversarial.rs that runs the p2p-node binary is skipped: these
  # builds do not rebuild the binary.
  "inbound|p2p-node|node/src/node/inbound.rs|p2p-tests|--test node_messaging --test adversarial --test relay -- --skip the_cli_warns_when"
)
groups=()
for want in "$@"; do
  case "$want" in
    fast) want=crypto ;;
    all) groups=("${all_groups[@]}"); break ;;
  esac
  found=""
  for g in "${all_groups[@]}"; do
    if [ "${g%%|*}" = "$want" ]; then groups+=("$g"); found=1; fi
  done
  [ -n "$found" ] || { echo "usage: $0 [fast|all|crypto|discovery|keyfile|wire|inbound...]" >&2; exit 2; }
done
# Of the server, only its verification: signed requests, timestamps, body and
# content-type checks; of the local store, its replay guard.
server_re='authenticate|check_not_future|is_json|refuse_oversize_body|method_label|JsonBody'

if [ -n "${MUTANTS_TARGET_DIR:-}" ]; then
  # A build directory of the caller's (e.g. this tree's target/, to reuse what it has
  # built), kept.
  export CARGO_TARGET_DIR=$MUTANTS_TARGET_DIR
else
  # One build directory for every group's copies, outside the copies (so it outlives
  # each of them), with line tables only, deleted when done.
  build=$PWD/target/mutants/build
  trap 'rm -rf "$build"' EXIT
  export CARGO_TARGET_DIR=$build
  export CARGO_PROFILE_DEV_DEBUG=${CARGO_PROFILE_DEV_DEBUG:-line-tables-only}
  export CARGO_PROFILE_TEST_DEBUG=${CARGO_PROFILE_TEST_DEBUG:-line-tables-only}
fi

list=scripts/mutants-equivalent.txt
# "file: description" without line and column, as listed.
normalize() { sed -E 's/^([^:]+):[0-9]+:[0-9]+: /\1: /'; }

summary=()
status=0
for g in "${groups[@]}"; do
  IFS='|' read -r name pkg files test_pkg test_args <<<"$g"
  out=target/mutants/$name
  mkdir -p "$out"
  args=(mutants --no-shuffle --package "$pkg" --output "$out" --timeout 120 --build-timeout 600)
  if [ "$test_pkg" != "$pkg" ]; then
    # cargo-mutants 27 runs its baseline with the mutated package's tests only, whatever
    # --test-package says: check the unmutated tree with the chosen tests here instead.
    echo "== baseline: cargo test -p $test_pkg $test_args"
    # shellcheck disable=SC2086
    cargo test -p "$test_pkg" $test_args ||
      { echo "the tests of $name fail on the unmutated tree" >&2; exit 1; }
    args+=(--test-package "$test_pkg" --baseline skip)
  fi
  for f in $files; do args+=(--file "$f"); done
  if [ -n "${MUTANTS_ONLY:-}" ]; then
    args+=(--re "$MUTANTS_ONLY")
  elif [ "$name" = discovery ]; then
    # Every mutant of record.rs; of server.rs, the verification only; of the local
    # store, the replay guard.
    args+=(--re "^discovery/src/record\.rs|^discovery/src/server\.rs:.*($server_re)|^discovery/src/store/local\.rs:.*ReplayCache")
  fi
  echo "== cargo mutants: $name ($files)"
  set +e
  # shellcheck disable=SC2086
  cargo "${args[@]}" -- $test_args
  rc=$?
  set -e
  # 0: all caught; 2: some missed; 3: some timed out. Anything else is a failure of
  # the run itself.
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 2 ] && [ "$rc" -ne 3 ]; then
    echo "cargo mutants failed for $name (exit $rc)" >&2
    exit "$rc"
  fi
  res=$out/mutants.out
  caught=$(wc -l <"$res/caught.txt")
  missed=$(cat "$res/missed.txt" "$res/timeout.txt" 2>/dev/null | wc -l)
  unviable=$(wc -l <"$res/unviable.txt")
  for f in $files; do
    c=$(grep -c "^$f:" "$res/caught.txt" || true)
    m=$(cat "$res/missed.txt" "$res/timeout.txt" 2>/dev/null | grep -c "^$f:" || true)
    l=$(cat "$res/missed.txt" "$res/timeout.txt" 2>/dev/null | { grep "^$f:" || true; } |
      normalize | { grep -Fxf <(grep -v '^#' "$list" | sed -n 's/ # .*//p') || true; } | wc -l)
    summary+=("| $f | $c of $((c + m)) | $l of $m |")
  done
  echo "$name: $caught caught, $missed missed or timed out, $unviable unviable"
  while IFS= read -r mutant; do
    key=$(printf '%s\n' "$mutant" | normalize)
    if ! grep -Fq -- "$key #" "$list"; then
      echo "NOT CAUGHT and not listed as equivalent: $mutant" >&2
      status=1
    fi
  done < <(cat "$res/missed.txt" "$res/timeout.txt" 2>/dev/null)
  # A listed mutant of these files that cargo-mutants no longer generates is stale.
  [ -z "${MUTANTS_ONLY:-}" ] || continue
  all_mutants=$(cat "$res"/{caught,missed,timeout,unviable}.txt 2>/dev/null | normalize)
  while IFS= read -r entry; do
    key=${entry%% #*}
    file=${key%%: *}
    case " $files " in *" $file "*) ;; *) continue ;; esac
    if ! grep -Fxq -- "$key" <<<"$all_mutants"; then
      echo "listed in $list but not generated any more: $key" >&2
      status=1
    fi
  done < <(grep -v '^#' "$list" | grep -v '^[[:space:]]*$')
done

echo
echo "| file | viable mutants caught | missed, listed as equivalent |"
echo "|---|---:|---:|"
printf '%s\n' "${summary[@]}"
exit "$status"
