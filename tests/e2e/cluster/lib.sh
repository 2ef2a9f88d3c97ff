# Shared by build/up/down (sourced, not executed). Everything lives under $E2E_HOME.
# shellcheck shell=bash
set -euo pipefail

E2E_HOME=${BACKFILL_E2E_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/backfill-e2e}
mkdir -p "$E2E_HOME"
E2E_HOME=$(cd "$E2E_HOME" && pwd -P)
CLUSTER_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd "$CLUSTER_DIR/../../.." && pwd -P)
DL=$E2E_HOME/downloads
MIRROR=${BACKFILL_E2E_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Which Kubernetes: "1.20" (Debian bookworm's source, dockershim kubelet on dockerd) or
# "latest" (k8s.io/kubernetes from the Go module proxy, kubelet on containerd).
K8S=${BACKFILL_E2E_K8S:-1.20}

log() { printf '[backfill-e2e %s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

lock_state() { # serialize up/down on one state directory
  [[ ${BACKFILL_E2E_LOCK_HELD:-} == "$E2E_HOME" ]] && return 0
  exec 9>"$E2E_HOME/.lock"
  flock -w "${BACKFILL_E2E_LOCK_TIMEOUT:-3600}" 9 || die "timed out waiting for $E2E_HOME/.lock"
  export BACKFILL_E2E_LOCK_HELD=$E2E_HOME
}
lock_build() { # lock_build PART FD: one build of PART at a time (builds of other parts run in parallel)
  eval "exec $2>\"\$E2E_HOME/.build-$1.lock\""
  flock -w "${BACKFILL_E2E_LOCK_TIMEOUT:-3600}" "$2" || die "timed out waiting for $E2E_HOME/.build-$1.lock"
}

parse_k8s_arg() { # --k8s VERSION on the command line overrides BACKFILL_E2E_K8S
  while [[ $# -gt 0 ]]; do
    case $1 in
      --k8s) K8S=$2; shift 2 ;;
      --k8s=*) K8S=${1#--k8s=}; shift ;;
      --force) FORCE=1; shift ;;
      *) die "unknown argument: $1" ;;
    esac
  done
  case $K8S in 1.20|latest) ;; *) die "--k8s must be 1.20 or latest, not $K8S" ;; esac
}
FORCE=0

# The private apt configuration (the system's apt state is untouched) for downloading
# Debian bookworm sources and .debs without installing them.
apt_private() { apt_private_suite bookworm "$@"; }
apt_private_suite() { # apt_private_suite SUITE APT-GET-ARGS...
  local APT=$E2E_HOME/apt/$1; shift
  mkdir -p "$APT/lists/partial" "$APT/archives/partial"
  printf 'deb %s %s main\ndeb-src %s %s main\n' "$MIRROR" "$(basename "$APT")" "$MIRROR" "$(basename "$APT")" >"$APT/sources.list"
  local opts=(
    -o "Dir::Etc::SourceList=$APT/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT"
    -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null
    -o APT::Get::List-Cleanup=0
  )
  [[ $(id -u) == 0 ]] && opts+=(-o APT::Sandbox::User=root)
  if [[ ! -f $APT/.updated ]]; then
    apt-get "${opts[@]}" -q update >&2
    touch "$APT/.updated"
  fi
  apt-get "${opts[@]}" -q "$@" >&2
}

one() { # exactly one file matching a glob, or die
  local m=("$@")
  [[ ${#m[@]} == 1 && -e ${m[0]} ]] || die "expected exactly one file for: $*"
  printf '%s\n' "${m[0]}"
}
