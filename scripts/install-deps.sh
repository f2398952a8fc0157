#!/usr/bin/env bash
# Installs what building and testing Tessera needs on Debian 12 (as root, or through sudo).
set -euo pipefail
packages=(build-essential cmake pkg-config libyaml-dev libffi-dev libpcre2-dev libjansson-dev libcairo2-dev libfontconfig-dev check)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
