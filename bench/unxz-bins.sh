#!/usr/bin/env bash
# Unpack the xz-compressed binaries scripts/pack-cuda.sh leaves in a folder
# (the device has no xz tool, so Python's lzma does it), skipping those whose
# unpacked copy is newer than the archive, and doing nothing where the folder
# holds plain binaries only.
#   bash bench/unxz-bins.sh .dev/bin
for f in "${1:?the folder of binaries}"/*.xz; do
  [ -e "$f" ] || continue
  [ -x "${f%.xz}" ] && [ "${f%.xz}" -nt "$f" ] && continue
  python3 -c "import lzma,sys; open(sys.argv[1][:-3],'wb').write(lzma.open(sys.argv[1]).read())" "$f" && chmod +x "${f%.xz}"
done
