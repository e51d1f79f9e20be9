#!/bin/sh
# "Builds" a package for the package_build batch: refuses to start before the artifacts of its
# dependencies exist, works for $BUILD_SECONDS, then writes its own artifact.
# Usage: build_package.sh NAME VERSION ARTIFACT_DIR [DEP1,DEP2,...]
set -eu
name=$1
version=$2
out=$3
deps=${4:-}
mkdir -p "$out"
for dep in $(echo "$deps" | tr ',' ' '); do
  if [ ! -f "$out/$dep.tar" ]; then
    echo "cannot build $name: artifact of dependency $dep is missing" >&2
    exit 3
  fi
done
if [ "${FAIL_PACKAGE:-}" = "$name" ]; then
  echo "build of $name failed: FAIL_PACKAGE=$name" >&2
  exit 1
fi
sleep "${BUILD_SECONDS:-0.3}"
printf '%s %s\n' "$name" "$version" > "$out/$name.tar.partial"
mv "$out/$name.tar.partial" "$out/$name.tar"
echo "built $name $version"
