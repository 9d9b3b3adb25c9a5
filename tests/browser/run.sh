#!/usr/bin/env bash
# Browser client tests: unit tests of web/chat-core.js and end-to-end tests of the chat
# page in chromium against the server binary ($WSCHAT_BIN, default target/debug/wschat).
# Run from anywhere; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error >/dev/null
node --test tests/browser/
