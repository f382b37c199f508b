#!/usr/bin/env bash
# The demo: start the local Orthanc, load the sample studies, ingest them into
# datasets/demo. Safe to run again: Orthanc keeps running, samples already stored
# are skipped, and series already ingested are not redone.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
workbench=.venv/bin/workbench

echo "== starting the local Orthanc"
"$workbench" orthanc start

echo "== loading sample studies (pydicom's bundled files and synthetic studies)"
# pydicom bundles some deliberately broken files; Orthanc rejects those and the
# load lists them, which is expected here.
if ! "$workbench" orthanc load --samples --no-progress; then
    echo "(the files listed above were refused; the demo goes on without them)"
fi

echo "== ingesting into datasets/demo"
status=0
"$workbench" ingest datasets/demo.toml || status=$?
case $status in
    0) ;;
    3) echo "(some instances were quarantined, as intended for the samples that may"
       echo " show burned-in text or cannot be decoded: see datasets/demo/quarantine.csv)" ;;
    *) exit "$status" ;;
esac

echo
echo "The dataset is in datasets/demo. The local Orthanc is still running:"
echo "stop it with '$workbench orthanc stop'."
