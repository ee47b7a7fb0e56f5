#!/usr/bin/env bash
# Make a test deployment of the secured broker: a local CA, a server certificate
# for localhost (plus --san names), passwords for the devices and clients, the
# Mosquitto password file and ACL, a ready mosquitto.conf, and the [mqtt] table
# of each device's edge-runtime config.
#
#   deploy/make-test-pki.sh OUTDIR [--port N] [--client ID]... [--san DNS:name|IP:addr]... [DEVICE_ID...]
#
# Defaults: device "device-01", client "client-01", port 8883. Idempotent: what
# exists is kept (the CA, keys, certificates, passwords); a user missing from the
# password file is added; the ACL and configs are rewritten only if they differ.
# Needs openssl and mosquitto_passwd (apt-get install openssl mosquitto).
# For a test deployment only: keys are unencrypted and the CA key sits next to them.
# Certificates are valid from 2020-01-01, not from now: a board without a battery-backed
# clock boots with its clock in the past (docs/deployment.md, "The device's clock").
set -euo pipefail

usage() {
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[[ $# -ge 1 && $1 != -* ]] || usage
OUT=$1
shift
PORT=8883
CLIENTS=()
DEVICES=()
SANS=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --port) PORT=${2:?--port needs a number}; shift 2 ;;
        --client) CLIENTS+=("${2:?--client needs an id}"); shift 2 ;;
        --san) SANS+=("${2:?--san needs DNS:name or IP:address}"); shift 2 ;;
        -h|--help) usage ;;
        -*) echo "unknown option $1" >&2; usage ;;
        *) DEVICES+=("$1"); shift ;;
    esac
done
[[ ${#DEVICES[@]} -gt 0 ]] || DEVICES=(device-01)
[[ ${#CLIENTS[@]} -gt 0 ]] || CLIENTS=(client-01)
[[ $PORT =~ ^[0-9]+$ ]] || { echo "--port: not a number: $PORT" >&2; exit 2; }

for tool in openssl mosquitto_passwd; do
    command -v "$tool" >/dev/null || { echo "error: $tool is not installed (apt-get install openssl mosquitto)" >&2; exit 1; }
done
NAME_RE='^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'
for id in "${DEVICES[@]}" "${CLIENTS[@]}"; do
    [[ $id =~ $NAME_RE ]] || { echo "error: '$id' is not a valid id (1-64 of A-Z a-z 0-9 . _ -)" >&2; exit 2; }
    [[ $id != fleet ]] || { echo "error: 'fleet' is reserved for the fleet topics" >&2; exit 2; }
done
dupes=$(printf '%s\n' "${DEVICES[@]}" "${CLIENTS[@]}" | sort | uniq -d)
[[ -z $dupes ]] || { echo "error: ids must be unique across devices and clients: $dupes" >&2; exit 2; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SAMPLE_CONF=$HERE/mosquitto/edge-device.conf
SAMPLE_ACL=$HERE/mosquitto/acl
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
umask 077
mkdir -p "$OUT/passwords" "$OUT/devices"

made() { echo "made:      $*"; }
kept() { echo "unchanged: $*"; }

# Sign a request with `openssl ca` (which, unlike `openssl x509 -req`, sets the start date):
# valid from VALID_FROM, not from now. A board without a battery-backed clock (a Jetson)
# boots with its clock in the past, before a certificate made today, and every TLS
# handshake would fail until its clock is set. Backdating gives nothing away: notAfter
# (-days from now) still ends it.
VALID_FROM=20200101000000Z
sign() {
    local db
    db=$(mktemp -d)
    : >"$db/index.txt"
    openssl rand -hex 16 >"$db/serial"
    printf '%s\n' "[ca]" "default_ca = test_ca" "[test_ca]" "database = $db/index.txt" "new_certs_dir = $db" \
        "serial = $db/serial" \
        "default_md = sha256" "policy = any" "unique_subject = no" "email_in_dn = no" "[any]" \
        "commonName = supplied" >"$db/ca.cnf"
    if ! openssl ca -batch -notext -preserveDN -config "$db/ca.cnf" -startdate "$VALID_FROM" "$@" \
            2>"$db/err"; then
        cat "$db/err" >&2
        rm -rf "$db"
        return 1
    fi
    rm -rf "$db"
}

# Write stdin to $1 only if the content differs.
write_if_changed() {
    local target=$1 tmp
    tmp=$(mktemp "$target.XXXXXX")
    cat >"$tmp"
    if [[ -f $target ]] && cmp -s "$tmp" "$target"; then
        rm -f "$tmp"
        kept "$target"
    else
        mv "$tmp" "$target"
        made "$target"
    fi
}

# --- CA ------------------------------------------------------------------------------
if [[ -f $OUT/ca.key && -f $OUT/ca.crt ]]; then
    kept "$OUT/ca.crt"
else
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$OUT/ca.key" -out "$OUT/ca.csr" -subj "/CN=edge-runtime test CA" 2>/dev/null
    sign -selfsign -keyfile "$OUT/ca.key" -in "$OUT/ca.csr" -out "$OUT/ca.crt" -days 3650 \
        -extfile <(printf '%s\n' "basicConstraints=critical,CA:TRUE" "keyUsage=critical,keyCertSign,cRLSign" \
            "subjectKeyIdentifier=hash")
    rm -f "$OUT/ca.csr"
    chmod 0644 "$OUT/ca.crt"
    made "$OUT/ca.crt (and ca.key)"
    rm -f "$OUT/server.crt"  # a new CA needs a new server certificate
fi

# --- server certificate ----------------------------------------------------------------
if [[ -f $OUT/server.key && -f $OUT/server.crt ]]; then
    kept "$OUT/server.crt"
else
    san="DNS:localhost,IP:127.0.0.1,IP:::1"
    for extra in "${SANS[@]}"; do san+=",$extra"; done
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$OUT/server.key" -out "$OUT/server.csr" -subj "/CN=localhost" 2>/dev/null
    sign -cert "$OUT/ca.crt" -keyfile "$OUT/ca.key" -in "$OUT/server.csr" -out "$OUT/server.crt" -days 825 \
        -extfile <(printf '%s\n' "subjectAltName=$san" "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature,keyAgreement" "extendedKeyUsage=serverAuth" \
            "authorityKeyIdentifier=keyid")
    rm -f "$OUT/server.csr"
    chmod 0644 "$OUT/server.crt"
    made "$OUT/server.crt ($san) and server.key"
fi

# --- passwords -------------------------------------------------------------------------
for id in "${DEVICES[@]}" "${CLIENTS[@]}"; do
    pw_file=$OUT/passwords/$id.password
    if [[ -f $pw_file ]]; then
        kept "$pw_file"
    else
        openssl rand -hex 16 >"$pw_file"
        made "$pw_file"
    fi
    if [[ -f $OUT/passwd ]] && grep -q "^$id:" "$OUT/passwd"; then
        kept "$OUT/passwd entry for $id"
    else
        create=()
        [[ -f $OUT/passwd ]] || create=(-c)
        mosquitto_passwd "${create[@]}" -b "$OUT/passwd" "$id" "$(head -n1 "$pw_file")" >/dev/null
        made "$OUT/passwd entry for $id"
    fi
done

# --- ACL: the sample's patterns, then one block per client and per device ---------------
{
    grep -v -E '^(user|topic) ' "$SAMPLE_ACL"
    echo
    echo "# --- Generated by make-test-pki.sh"
    for id in "${CLIENTS[@]}"; do
        printf '%s\n' "user $id" "topic write edge/+/v1/generate" "topic write edge/+/v1/cancel" \
            "topic read edge/+/v1/status" ""
    done
    for id in "${DEVICES[@]}"; do
        printf '%s\n' "user $id" "topic read edge/fleet/v1/generate" \
            "topic write edge/fleet/v1/reply/#" ""
    done
} | write_if_changed "$OUT/acl"

# --- mosquitto.conf: the sample with this folder's files and port -------------------------
sed -e "s|^listener 8883$|listener $PORT|" \
    -e "s|^certfile .*|certfile $OUT/server.crt|" \
    -e "s|^keyfile .*|keyfile $OUT/server.key|" \
    -e "s|^cafile .*|cafile $OUT/ca.crt|" \
    -e "s|^password_file .*|password_file $OUT/passwd|" \
    -e "s|^acl_file .*|acl_file $OUT/acl|" \
    -e "1i # Generated by make-test-pki.sh from deploy/mosquitto/edge-device.conf.\n# Run: mosquitto -c $OUT/mosquitto.conf" \
    "$SAMPLE_CONF" | write_if_changed "$OUT/mosquitto.conf"

# --- each device's [mqtt] table for /etc/edge-runtime/config.toml -------------------------
for id in "${DEVICES[@]}"; do
    printf '%s\n' "[mqtt]" "broker = \"mqtts://localhost:$PORT\"" "device_id = \"$id\"" "username = \"$id\"" \
        "password_file = \"$OUT/passwords/$id.password\"" "tls_ca = \"$OUT/ca.crt\"" 'protocol = "5"' \
        | write_if_changed "$OUT/devices/$id.toml"
done

# The broker drops to the mosquitto user when started as root: let it read its files.
if [[ $(id -u) -eq 0 ]] && getent group mosquitto >/dev/null; then
    chgrp mosquitto "$OUT/server.key" "$OUT/passwd" "$OUT/acl" "$OUT/mosquitto.conf"
    chmod 0640 "$OUT/server.key" "$OUT/passwd" "$OUT/acl" "$OUT/mosquitto.conf"
fi
chmod 0755 "$OUT"
chmod 0644 "$OUT/ca.crt" "$OUT/server.crt"

echo
echo "devices: ${DEVICES[*]}; clients: ${CLIENTS[*]}; broker: mqtts://localhost:$PORT"
echo "start the broker:  mosquitto -c $OUT/mosquitto.conf"
echo "watch a status:    mosquitto_sub -h localhost -p $PORT --cafile $OUT/ca.crt -u ${CLIENTS[0]} \\"
echo "                     -P \"\$(cat $OUT/passwords/${CLIENTS[0]}.password)\" -t 'edge/+/v1/status' -v"
echo "device config:     $OUT/devices/${DEVICES[0]}.toml ([mqtt] table of /etc/edge-runtime/config.toml)"
