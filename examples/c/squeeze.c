// squeeze: a prompt compressor in C for Tollgate's `compressor` world.
//
// Long messages pasted into prompts — logs, tool output, copied documents —
// carry bytes that cost tokens and say nothing: trailing spaces, runs of
// spaces and tabs, stacks of blank lines, and the same line repeated
// hundreds of times. squeeze removes them without changing what a message
// says:
//
//   * trailing whitespace is cut from every line;
//   * outside ``` code fences, runs of spaces and tabs inside a line become
//     one space (indentation at the start of a line is kept), and more than
//     one blank line in a row becomes one;
//   * a line repeated `fold_repeats` times or more in a row (inside fences
//     too) is kept once, followed by "[previous line repeated N more times]".
//
// System messages are left alone unless `system` is true (they are the
// application's own words, and a stable prefix for provider caching).
// Messages shorter than `min_chars` are left alone, and so is the whole
// request when squeezing saves fewer than `min_saved_chars` characters.
//
// Config (JSON, every key optional):
//   {"min_chars": 400, "fold_repeats": 3, "min_saved_chars": 64, "system": false}

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compressor.h"

typedef struct {
  long min_chars;
  long fold_repeats;
  long min_saved_chars;
  bool system;
} settings_t;

static settings_t SETTINGS = {400, 3, 64, false};

// ---- config: a flat JSON object of numbers and booleans -------------------

typedef struct {
  const char *start, *p, *end;
  char err[160];
} parser_t;

static void skip_ws(parser_t *ps) {
  while (ps->p < ps->end && isspace((unsigned char)*ps->p)) ps->p++;
}

static bool expect_char(parser_t *ps, char c) {
  skip_ws(ps);
  if (ps->p < ps->end && *ps->p == c) {
    ps->p++;
    return true;
  }
  snprintf(ps->err, sizeof ps->err, "config: expected '%c' at offset %ld", c, (long)(ps->p - ps->start));
  return false;
}

// Reads a key into `key` (at most 31 bytes, no escapes: keys are ours).
static bool parse_key(parser_t *ps, char key[32]) {
  if (!expect_char(ps, '"')) return false;
  size_t n = 0;
  while (ps->p < ps->end && *ps->p != '"') {
    if (n == 31 || *ps->p == '\\') {
      snprintf(ps->err, sizeof ps->err, "config: unknown key");
      return false;
    }
    key[n++] = *ps->p++;
  }
  key[n] = 0;
  return expect_char(ps, '"');
}

static bool parse_value(parser_t *ps, const char *key, settings_t *s) {
  skip_ws(ps);
  long *num = NULL;
  if (!strcmp(key, "min_chars")) num = &s->min_chars;
  else if (!strcmp(key, "fold_repeats")) num = &s->fold_repeats;
  else if (!strcmp(key, "min_saved_chars")) num = &s->min_saved_chars;
  else if (!strcmp(key, "system")) {
    size_t left = (size_t)(ps->end - ps->p);
    if (left >= 4 && !strncmp(ps->p, "true", 4)) { s->system = true; ps->p += 4; return true; }
    if (left >= 5 && !strncmp(ps->p, "false", 5)) { s->system = false; ps->p += 5; return true; }
    snprintf(ps->err, sizeof ps->err, "config: system must be true or false");
    return false;
  } else {
    snprintf(ps->err, sizeof ps->err,
             "config: unknown key \"%s\" (known: min_chars, fold_repeats, min_saved_chars, system)", key);
    return false;
  }
  char *stop = NULL;
  long v = strtol(ps->p, &stop, 10);
  if (stop == ps->p || stop > ps->end || v < 0 || v > 100000000 || *stop == '.') {
    snprintf(ps->err, sizeof ps->err, "config: %s must be a whole number, 0 or more", key);
    return false;
  }
  ps->p = stop;
  *num = v;
  return true;
}

// Parses `text` into `out`; on failure leaves a reason in ps->err.
static bool parse_config(const char *text, size_t len, settings_t *out, parser_t *ps) {
  settings_t s = {400, 3, 64, false};
  ps->start = ps->p = text;
  ps->end = text + len;
  ps->err[0] = 0;
  skip_ws(ps);
  if (ps->p == ps->end) { *out = s; return true; }  // no config: defaults
  if (!expect_char(ps, '{')) return false;
  skip_ws(ps);
  if (ps->p < ps->end && *ps->p == '}') {
    ps->p++;
  } else {
    for (;;) {
      char key[32];
      if (!parse_key(ps, key) || !expect_char(ps, ':') || !parse_value(ps, key, &s)) return false;
      skip_ws(ps);
      if (ps->p < ps->end && *ps->p == ',') { ps->p++; continue; }
      if (!expect_char(ps, '}')) return false;
      break;
    }
  }
  skip_ws(ps);
  if (ps->p != ps->end) {
    snprintf(ps->err, sizeof ps->err, "config: text after the closing brace");
    return false;
  }
  *out = s;
  return true;
}

// ---- squeezing -------------------------------------------------------------

typedef struct {
  char *buf;
  size_t len, cap;
} out_t;

static bool put(out_t *o, const char *s, size_t n) {
  if (o->len + n > o->cap) {
    size_t cap = o->cap ? o->cap * 2 : 256;
    while (cap < o->len + n) cap *= 2;
    char *b = realloc(o->buf, cap);
    if (!b) return false;
    o->buf = b;
    o->cap = cap;
  }
  memcpy(o->buf + o->len, s, n);
  o->len += n;
  return true;
}

// One line normalised: trailing whitespace cut; outside fences, inner runs
// of spaces and tabs made one space. Written to `line` (len returned).
static size_t normalise(const char *s, size_t n, bool in_fence, char *line) {
  while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r')) n--;
  size_t i = 0, w = 0;
  while (i < n && (s[i] == ' ' || s[i] == '\t')) line[w++] = s[i++];  // indentation
  bool space = false;
  for (; i < n; i++) {
    char c = s[i];
    if (!in_fence && (c == ' ' || c == '\t')) {
      space = true;
      continue;
    }
    if (space) line[w++] = ' ';
    space = false;
    line[w++] = c;
  }
  return w;
}

static bool flush_run(out_t *o, const char *line, size_t n, long repeats, long fold) {
  if (repeats == 0) return true;
  if (fold > 0 && repeats >= fold) {
    char note[64];
    int k = snprintf(note, sizeof note, "[previous line repeated %ld more times]\n", repeats - 1);
    return put(o, line, n) && put(o, "\n", 1) && put(o, note, (size_t)k);
  }
  for (long r = 0; r < repeats; r++)
    if (!put(o, line, n) || !put(o, "\n", 1)) return false;
  return true;
}

// Squeezes `text` into `o`; counts folded lines. False only when out of memory.
static bool squeeze(const char *text, size_t len, long fold, out_t *o, long *folded) {
  char *line = malloc(len + 1), *prev = malloc(len + 1);
  if (!line || !prev) { free(line); free(prev); return false; }
  size_t prev_n = 0;
  long repeats = 0;
  int blanks = 0;
  bool in_fence = false, ok = true;
  const char *p = text, *end = text + len;
  while (ok && p <= end) {
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    const char *stop = nl ? nl : end;
    if (!nl && p == end) break;  // no empty line after a final newline
    size_t n = normalise(p, (size_t)(stop - p), in_fence, line);
    bool fence = n >= 3 && !strncmp(line + strspn(line, " \t"), "```", 3);
    if (repeats > 0 && n == prev_n && !memcmp(line, prev, n) && !fence) {
      repeats++;
    } else {
      if (fold > 0 && repeats >= fold) *folded += repeats - 1;
      ok = flush_run(o, prev, prev_n, repeats, fold);
      repeats = 0;
      if (n == 0) {
        // Blank lines are never folded; outside fences at most one in a row.
        if (in_fence || ++blanks <= 1) ok = ok && put(o, "\n", 1);
      } else {
        blanks = 0;
        memcpy(prev, line, n);
        prev_n = n;
        repeats = 1;
      }
    }
    if (fence) {
      ok = ok && flush_run(o, prev, prev_n, repeats, fold);
      repeats = 0;
      in_fence = !in_fence;
    }
    if (!nl) break;
    p = nl + 1;
  }
  if (fold > 0 && repeats >= fold) *folded += repeats - 1;
  ok = ok && flush_run(o, prev, prev_n, repeats, fold);
  // The text did not end with a newline: neither does its squeezed form.
  if (ok && len > 0 && text[len - 1] != '\n' && o->len > 0 && o->buf[o->len - 1] == '\n') o->len--;
  free(line);
  free(prev);
  return ok;
}

// ---- the world's exports ---------------------------------------------------

bool exports_compressor_init(compressor_string_t *config, compressor_string_t *err) {
  // WIT strings are not NUL-terminated; strtol needs a terminated copy.
  char *text = malloc(config->len + 1);
  if (!text) {
    compressor_string_free(config);
    compressor_string_dup(err, "config: out of memory");
    return false;
  }
  memcpy(text, config->ptr, config->len);
  text[config->len] = 0;
  parser_t ps;
  bool ok = parse_config(text, config->len, &SETTINGS, &ps);
  free(text);
  compressor_string_free(config);
  if (!ok) compressor_string_dup(err, ps.err);
  return ok;
}

void exports_compressor_compress(compressor_request_view_t *req, compressor_compression_t *ret) {
  const settings_t s = SETTINGS;
  size_t count = req->messages.len;
  tollgate_policy_types_kept_message_t *kept = calloc(count ? count : 1, sizeof *kept);
  long saved = 0, folded = 0, touched = 0;
  bool ok = kept != NULL;
  for (size_t i = 0; ok && i < count; i++) {
    tollgate_policy_types_message_t *m = &req->messages.ptr[i];
    kept[i].source = (uint32_t)i;
    bool is_system = m->role.len == 6 && !memcmp(m->role.ptr, "system", 6);
    if (!m->text_only || (long)m->content.len < s.min_chars || (is_system && !s.system)) continue;
    out_t o = {0};
    if (!squeeze((const char *)m->content.ptr, m->content.len, s.fold_repeats, &o, &folded)) {
      free(o.buf);
      ok = false;
      break;
    }
    if (o.len < m->content.len) {
      saved += (long)(m->content.len - o.len);
      touched++;
      kept[i].content.is_some = true;
      if (o.len == 0) {  // all whitespace: an empty string owns no buffer
        free(o.buf);
        o.buf = NULL;
      }
      kept[i].content.val.ptr = (uint8_t *)o.buf;
      kept[i].content.val.len = o.len;
    } else {
      free(o.buf);
    }
  }
  if (!ok || saved < s.min_saved_chars) {
    // Out of memory, or not worth a rewrite: the request goes as it came.
    for (size_t i = 0; kept && i < count; i++)
      if (kept[i].content.is_some) free(kept[i].content.val.ptr);
    free(kept);
    ret->tag = TOLLGATE_POLICY_TYPES_COMPRESSION_UNCHANGED;
  } else {
    char note[160];
    snprintf(note, sizeof note, "squeezed %ld message%s: %ld characters of whitespace and repeats removed, %ld repeated lines folded",
             touched, touched == 1 ? "" : "s", saved, folded);
    ret->tag = TOLLGATE_POLICY_TYPES_COMPRESSION_REWRITTEN;
    ret->val.rewritten.messages.ptr = kept;
    ret->val.rewritten.messages.len = count;
    compressor_string_dup(&ret->val.rewritten.note, note);
  }
  // The request view belongs to the export: free it, or a warm instance
  // would keep every request it has seen.
  compressor_request_view_free(req);
}
