#!/usr/bin/env bash
# CI release check (issue 16): `python -m build` makes an sdist and, from that sdist, a wheel;
# a fresh venv installs the wheel (no extras, nothing from the source tree), `balancer --version`
# prints the version of pyproject.toml, and `balancer serve --demo` serves recommendations and
# stops cleanly on Ctrl-C (.ci/smoke_demo.py binary). Needs the test venv (.venv, which has
# `build` from the dev extra). Uses the pip cache; about a minute on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d /tmp/balancer-release-XXXXXX)"
trap 'rm -rf "$tmp"' EXIT
.venv/bin/python -m build --outdir "$tmp/dist" . >"$tmp/build.log" 2>&1 || {
    tail -40 "$tmp/build.log"; echo "release: FAIL: python -m build"; exit 1; }
version="$(.venv/bin/python -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
wheel="$tmp/dist/balancer-$version-py3-none-any.whl"
sdist="$tmp/dist/balancer-$version.tar.gz"
ls -l "$tmp/dist"
[ -f "$wheel" ] && [ -f "$sdist" ] || { echo "release: FAIL: expected $wheel and $sdist"; exit 1; }
# the sdist carries what a rebuild and a user need
listing="$(tar -tzf "$sdist")"
for f in LICENSE README.md CHANGELOG.md pyproject.toml balancer/data/demo-cluster.json \
         packaging/systemd/balancer.service packaging/prometheus/alerts.yml \
         packaging/grafana/balancer.json; do
    grep -qx "balancer-$version/$f" <<<"$listing" || {
        echo "release: FAIL: $f missing from the sdist"; exit 1; }
done
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --no-compile "$wheel"
got="$(cd "$tmp" && "$tmp/venv/bin/balancer" --version)"
[ "$got" = "balancer $version" ] || { echo "release: FAIL: --version says '$got', pyproject '$version'"; exit 1; }
echo "release: $got from the wheel"
python3 .ci/smoke_demo.py binary "$tmp/venv/bin/balancer"
echo "release: OK"
