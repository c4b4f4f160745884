/* Compact JSON text of a json-c tree (see json_text.h). json-c's own serializer formats
 * through a printbuf per node and vsnprintf per number; an event's params are written once
 * per raise on the loop thread, so this one appends to one reused buffer instead. Doubles
 * (and trees deeper than MAX_DEPTH) are left to json-c, so that their text is json-c's. */
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <string.h>

#include <json-c/json.h>

#include "hub/alloc.h"
#include "transports/json_text.h"

#define MAX_DEPTH 64

static int reserve(tr_buf *b, size_t more)
{
    if (b->cap - b->len >= more)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->len < more) {
        if (cap > SIZE_MAX / 2)
            return -ENOMEM;
        cap *= 2;
    }
    char *p = hub_realloc(b->data, cap);
    if (!p)
        return -ENOMEM;
    b->data = p;
    b->cap = cap;
    return 0;
}

static int put(tr_buf *b, const char *s, size_t n)
{
    if (reserve(b, n) < 0)
        return -ENOMEM;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    return 0;
}

static int put_string(tr_buf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    /* at worst every byte becomes \u00XX: reserve once */
    if (n > (SIZE_MAX - 2) / 6 || reserve(b, n * 6 + 2) < 0)
        return -ENOMEM;
    char *o = b->data + b->len;
    *o++ = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *o++ = (char)c;
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '"':
            *o++ = '"';
            break;
        case '\\':
            *o++ = '\\';
            break;
        case '\n':
            *o++ = 'n';
            break;
        case '\r':
            *o++ = 'r';
            break;
        case '\t':
            *o++ = 't';
            break;
        case '\b':
            *o++ = 'b';
            break;
        case '\f':
            *o++ = 'f';
            break;
        default:
            *o++ = 'u';
            *o++ = '0';
            *o++ = '0';
            *o++ = hex[c >> 4];
            *o++ = hex[c & 15];
        }
    }
    *o++ = '"';
    b->len = (size_t)(o - b->data);
    return 0;
}

static int put_int(tr_buf *b, const json_object *o)
{
    char tmp[24], *p = tmp + sizeof(tmp);
    int64_t v = json_object_get_int64(o);
    uint64_t u;
    int neg = v < 0;
    /* json-c clamps a uint64 above INT64_MAX to INT64_MAX in get_int64 */
    if (v == INT64_MAX)
        u = json_object_get_uint64(o);
    else
        u = neg ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        *--p = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (neg)
        *--p = '-';
    return put(b, p, (size_t)(tmp + sizeof(tmp) - p));
}

static int append(tr_buf *b, const json_object *o, int depth)
{
    switch (json_object_get_type(o)) {
    case json_type_null:
        return put(b, "null", 4);
    case json_type_boolean:
        return json_object_get_boolean(o) ? put(b, "true", 4) : put(b, "false", 5);
    case json_type_int:
        return put_int(b, o);
    case json_type_string:
        return put_string(b, json_object_get_string((json_object *)o),
                          (size_t)json_object_get_string_len(o));
    case json_type_double:
        break;
    case json_type_array:
        if (depth >= MAX_DEPTH)
            break;
        if (put(b, "[", 1) < 0)
            return -ENOMEM;
        for (size_t i = 0, n = json_object_array_length(o); i < n; i++) {
            if ((i && put(b, ",", 1) < 0) ||
                append(b, json_object_array_get_idx(o, i), depth + 1) < 0)
                return -ENOMEM;
        }
        return put(b, "]", 1);
    case json_type_object: {
        if (depth >= MAX_DEPTH)
            break;
        int first = 1;
        if (put(b, "{", 1) < 0)
            return -ENOMEM;
        json_object_object_foreach((json_object *)o, key, val)
        {
            if ((!first && put(b, ",", 1) < 0) || put_string(b, key, strlen(key)) < 0 ||
                put(b, ":", 1) < 0 || append(b, val, depth + 1) < 0)
                return -ENOMEM;
            first = 0;
        }
        return put(b, "}", 1);
    }
    }
    /* a double, or a subtree too deep for this recursion: json-c's text */
    size_t n;
    const char *t = json_object_to_json_string_length(
        (json_object *)o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE, &n);
    return t ? put(b, t, n) : -ENOMEM;
}

int tr_json_append(tr_buf *b, const json_object *o) { return append(b, o, 0); }

void tr_buf_free(tr_buf *b)
{
    hub_free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}
