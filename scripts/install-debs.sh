#!/bin/sh
# Installs the vendored Debian packages an image build copied into FOLDER, with dpkg (no apt:
# the build has no network). Both Dockerfiles run it; what FOLDER holds decides what happens:
#   FOLDER/*.deb     installed as they are (libnuma1 for vLLM's extension)
#   FOLDER/toolchain gcc, g++ and libc6-dev (CUDA variants: Triton builds its launcher with a C
#                    compiler the first time it runs a kernel, and torch.compile's Inductor on a
#                    GPU runs Triton). Each package is installed only where the base lacks it;
#                    libc6 also where its version differs, since libc6-dev pins it exactly.
#   FOLDER/headers   Debian's libpython3.11-dev, unpacked (not installed: it pins Debian's python3.11)
#                    for Python.h, only where the base's Python has none (the official image has it)
# vendor/vendor.py (DEB_FILES, CUDA_DEB_FILES) says which packages and why, pinned by sha256.
#
#   sh scripts/install-debs.sh /tmp/debs
set -eu
folder="$1"

set --
for deb in "$folder"/*.deb; do
    [ -e "$deb" ] && set -- "$@" "$deb"
done
if [ $# -gt 0 ]; then
    dpkg -i "$@" >/dev/null
fi

if [ -d "$folder/toolchain" ]; then
    set --
    for deb in "$folder"/toolchain/*.deb; do
        pkg="$(dpkg-deb -f "$deb" Package)"
        have="$(dpkg-query -W -f '${db:Status-Status} ${Version}' "$pkg" 2>/dev/null || true)"
        case "$have" in
            "installed $(dpkg-deb -f "$deb" Version)") ;;
            "installed "*) if [ "$pkg" = libc6 ]; then set -- "$@" "$deb"; fi ;;
            *) set -- "$@" "$deb" ;;
        esac
    done
    if [ $# -gt 0 ]; then
        dpkg -i --path-exclude='/usr/share/doc/*' --path-exclude='/usr/share/man/*' \
                --path-exclude='/usr/share/info/*' --path-exclude='/usr/share/locale/*' "$@" >/dev/null
    fi
    gcc --version >/dev/null
    g++ --version >/dev/null
fi

if [ -d "$folder/headers" ] && ! python3 -c 'import os, sys, sysconfig
sys.exit(not os.path.isfile(sysconfig.get_paths(scheme="posix_prefix")["include"] + "/Python.h"))'; then
    dpkg-deb --fsys-tarfile "$folder"/headers/libpython3*-dev_*.deb | tar -x -C / ./usr/include
fi
