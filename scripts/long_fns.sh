#!/usr/bin/env bash
# Lists the functions in crates/ longer than a limit (default 150 lines), longest first:
# "LINES path:line name". Relies on rustfmt's layout: a function's body ends at the first
# line holding only `}` at the indentation of its `fn` line. Exit status 0 either way.
# Usage: scripts/long_fns.sh [LIMIT] [DIR...]
set -euo pipefail
limit="${1:-150}"
shift || true
cd "$(dirname "$0")/.."
dirs=("$@")
[ ${#dirs[@]} -eq 0 ] && dirs=(crates)
find "${dirs[@]}" -name '*.rs' -not -path '*/target/*' -print0 | sort -z |
  xargs -0 awk -v limit="$limit" '
    FNR == 1 { open = 0 }
    !open && match($0, /^[ \t]*((pub(\([^)]*\))?|const|async|unsafe|extern "C") +)*fn +[A-Za-z_][A-Za-z0-9_]*/) {
      if ($0 ~ /;[ \t]*$/) next          # a declaration without a body (trait item)
      head = substr($0, RSTART, RLENGTH)
      match(head, /^[ \t]*/); indent = substr(head, 1, RLENGTH)
      name = head; sub(/.*fn +/, "", name)
      start = FNR; file = FILENAME; open = 1
      if ($0 ~ /\}[ \t]*$/ && $0 ~ /\{/) open = 0   # a one-line function
      next
    }
    open && $0 == indent "}" {
      n = FNR - start + 1
      if (n > limit) printf "%d %s:%d %s\n", n, file, start, name
      open = 0
    }
  ' | sort -rn
