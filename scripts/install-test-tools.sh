#!/usr/bin/env bash
# Debian packages the test suite runs against: Orthanc (+ DICOMweb plugin) as the PACS, dcmtk's
# storescu/findscu/getscu/movescu/dsrdump as DICOM peers, dicom3tools' dciodvfy, openssl, PostgreSQL and Redis,
# and Chromium, which Playwright drives for the worklist page's tests (never `playwright install`).
# Installs only what is missing, and only as root (apt); otherwise it says what is missing and
# leaves it to `make test`, which then fails on the first test that needs it.
# Used by both `make test` and `.ci/run`, so that the README's test command alone works on a new machine.
set -euo pipefail

need=()
command -v Orthanc >/dev/null || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v storescu >/dev/null || need+=(dcmtk)
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v openssl >/dev/null || need+=(openssl)  # certificates for the DICOM TLS tests
command -v pg_ctlcluster >/dev/null || command -v pg_isready >/dev/null || need+=(postgresql)
command -v redis-server >/dev/null || need+=(redis-server)
[ -x /usr/bin/chromium ] || need+=(chromium)

if [ ${#need[@]} -eq 0 ]; then
  echo "test tools: all present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "test tools missing: ${need[*]} (run as root on Debian/Ubuntu to install them: apt-get install ${need[*]})" >&2
  exit 0
fi
echo "test tools: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}"
