// The cache policy's WebAssembly entry points (the `cache-policy` world):
// turns the decisions of policy.js into WIT values and logs why.
import { log } from 'tollgate:policy/host@0.1.0';
import { settings, decide, admitAnswer } from './policy.js';

let cfg = settings('');

export function init(config) {
  try {
    cfg = settings(config);
  } catch (e) {
    // A thrown string becomes init's `err`: the gateway refuses the plugin with it.
    throw String(e.message ?? e);
  }
}

export function lookup(req) {
  const d = decide(req, cfg);
  if (d.bypass) return { tag: 'bypass', val: d.bypass };
  log('debug', `${d.scope}: ${d.why}`);
  return { tag: 'lookup', val: { scope: d.scope, ttlSeconds: d.ttl } };
}

export function admit(req, response) {
  const a = admitAnswer(req, response, cfg);
  if (!a.admit) log('debug', `not stored: ${a.why}`);
  return a.admit;
}
