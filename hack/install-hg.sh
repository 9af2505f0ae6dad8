#!/usr/bin/env bash
# Installs Mercurial 5.6.1 (the last Debian release with wire protocol v2) into $1 (default ./bin/hg-5.6.1)
# from Debian 11's packages, without touching the system: apt runs with a private sources list and
# private state, and the packages are unpacked, not installed. ./bin/hg is a wrapper that runs the
# pure-Python modules on the machine's python3 (the C extensions are built for Python 3.9).
# Idempotent: does nothing when the wrapper already reports 5.6.1.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(pwd)/bin
dest=${1:-$bin/hg-5.6.1}
version=5.6.1-4
mkdir -p "$bin"

if [ -x "$bin/hg" ] && "$bin/hg" --version --quiet 2>/dev/null | grep -q '5\.6\.1'; then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
echo "deb [signed-by=$keyring] http://deb.debian.org/debian bullseye main" >"$work/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o APT::Sandbox::User=root
  -o Debug::NoLocking=1)
apt-get "${apt_opts[@]}" update -qq
(cd "$work" && apt-get "${apt_opts[@]}" download -qq "mercurial=$version" "mercurial-common=$version")
rm -rf "$dest"
mkdir -p "$dest"
for deb in "$work"/mercurial*_"$version"_*.deb; do
  dpkg-deb -x "$deb" "$dest"
done

cat >"$bin/hg" <<WRAP
#!/bin/sh
# Mercurial $version from Debian 11, pure Python (installed by hack/install-hg.sh).
PYTHONPATH="$dest/usr/lib/python3/dist-packages\${PYTHONPATH:+:\$PYTHONPATH}" HGMODULEPOLICY=py exec python3 "$dest/usr/bin/hg" "\$@"
WRAP
chmod +x "$bin/hg"
"$bin/hg" --version --quiet
