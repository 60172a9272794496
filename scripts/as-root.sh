# Sourced by the scripts that need root: as root they go on, otherwise they run themselves
# again through sudo (a root shell on a minimal Debian has no sudo, and needs none).
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    exec sudo --preserve-env=SYNWATCH_CONFIG,PYTHON "$0" "$@"
  fi
  echo "synwatch: $(basename "$0"): run as root (there is no sudo to ask)" >&2
  exit 1
fi
