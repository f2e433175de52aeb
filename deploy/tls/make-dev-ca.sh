#!/usr/bin/env bash
# Make a private CA and a server certificate for the verifier (or its proxy), for tests and demonstrations.
# Production uses the organisation's CA; the agent trusts whichever CA through SSL_CERT_FILE (see
# docs/operations.md, "TLS between agent and verifier").
#   deploy/tls/make-dev-ca.sh OUT_DIR [SERVER_NAME ...]
set -euo pipefail
out=${1:?usage: make-dev-ca.sh OUT_DIR [SERVER_NAME ...]}
shift
names=("${@:-localhost}")
mkdir -p "$out"
umask 077
san="IP:127.0.0.1"
for n in "${names[@]}"; do san="$san,DNS:$n"; done
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
  -subj "/CN=Tianping private CA" -keyout "$out/ca.key" -out "$out/ca.pem" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=${names[0]}" \
  -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" -CAcreateserial -days 397 \
  -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san") -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/ca.srl"
chmod 0644 "$out/ca.pem" "$out/server.pem"
echo "CA: $out/ca.pem  server: $out/server.pem (key $out/server.key) for ${names[*]} and 127.0.0.1"
