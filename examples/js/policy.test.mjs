// Unit tests of the cache policy's logic: `node --test examples/js/`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { settings, decide, admitAnswer, personalData, hasSecret } from './policy.js';

const s = settings('{"ttl_by_feature": {"docs": 60}}');
const req = (text, extra = {}) => ({
  tenant: 't', user: 'u', feature: 'support', tags: [], hasTools: false,
  messages: [{ role: 'system', content: 'You are the help desk.' }, { role: 'user', content: text }],
  ...extra,
});

test('finds personal data and checks card and iban digits', () => {
  assert.deepEqual(personalData('mail me at ann.lee@example.co.uk'), ['email']);
  assert.deepEqual(personalData('call +1 415 555 0100 please'), ['phone']);
  assert.deepEqual(personalData('card 4111 1111 1111 1111'), ['payment card']);
  assert.deepEqual(personalData('card 4111 1111 1111 1112'), []);
  assert.deepEqual(personalData('IBAN GB82 WEST 1234 5698 7654 32'), ['iban']);
  assert.deepEqual(personalData('IBAN GB82 WEST 1234 5698 7654 33'), []);
  assert.deepEqual(personalData('where is order #A-99812'), ['reference']);
  assert.deepEqual(personalData('how do I export a CSV with 3 columns'), []);
  assert.ok(hasSecret('my key is sk-proj-abcdefghijklmnopqrstuv'));
  assert.ok(hasSecret('password: hunter2'));
  assert.ok(!hasSecret('how do I reset my password'));
});

test('general questions are shared by the tenant, with the ttl of their feature', () => {
  assert.deepEqual(decide(req('How do I export invoices as CSV?'), s), { scope: 'tenant', ttl: 3600, why: 'general question' });
  assert.equal(decide(req('How do I export invoices as CSV?', { feature: 'docs' }), s).ttl, 60);
});

test('questions about the user or carrying their data are private to them', () => {
  assert.equal(decide(req('When does my plan renew?'), s).scope, 'tenant-user');
  assert.equal(decide(req('Change the email to bob@example.com'), s).scope, 'tenant-user');
  const injected = req('What is the balance?');
  injected.messages.splice(1, 0, { role: 'system', content: 'Account data: plan Pro, balance 12.00' });
  assert.deepEqual(decide(injected, s).scope, 'tenant-user');
});

test('secrets, the present, hot sampling and agent steps are never cached', () => {
  assert.ok(decide(req('use api_key=abc123 to call it'), s).bypass);
  assert.ok(decide(req('what is the latest release?'), s).bypass);
  assert.ok(decide(req('hello', { temperature: 0.9 }), s).bypass);
  assert.ok(decide(req('hello', { hasTools: true }), s).bypass);
});

test('answers are stored only when complete, not refusals, and without personal data when shared', () => {
  const ok = { finishReason: 'stop', content: 'Go to Settings > Export.' };
  assert.equal(admitAnswer(req('How do I export?'), ok, s).admit, true);
  assert.equal(admitAnswer(req('How do I export?'), { ...ok, finishReason: 'length' }, s).admit, false);
  assert.equal(admitAnswer(req('How do I export?'), { ...ok, content: "I'm sorry, but I can't." }, s).admit, false);
  const leaky = { finishReason: 'stop', content: 'Write to ann@example.com for exports.' };
  assert.equal(admitAnswer(req('Who handles exports?'), leaky, s).admit, false);
  assert.equal(admitAnswer(req('Who handles my exports?'), leaky, s).admit, true);
});

test('only the ask around a pasted document is read for cues', () => {
  const doc = `The current status was reviewed.\n\n${'Revenue grew in every region. '.repeat(40)}\n\nMy notes: none.`;
  assert.equal(decide(req(`Summarize this report:\n\n${doc}\n\nThanks.`), s).scope, 'tenant');
  assert.equal(decide(req(`Summarize my report:\n\n${doc}\n\nThanks.`), s).scope, 'tenant-user');
  assert.ok(decide(req(`What changed since yesterday in this report?\n\n${doc}`), s).bypass);
});

test('bad config is refused with a reason', () => {
  assert.throws(() => settings('{"ttl": 5}'), /unknown config keys: ttl/);
  assert.throws(() => settings('{"ttl_seconds": 0}'), /whole seconds/);
  assert.throws(() => settings('[1]'), /JSON object/);
});
