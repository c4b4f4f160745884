/* Compact JSON text of a json-c tree, appended to a reusable buffer: the events module
 * serializes each raise's params once, without json-c's per-node printbuf. Pure. */
#ifndef TR_JSON_TEXT_H
#define TR_JSON_TEXT_H

#include <stddef.h>

struct json_object;

/* A growable byte buffer (hub_realloc'd); {0} is an empty one. */
typedef struct tr_buf {
    char *data;
    size_t len, cap;
} tr_buf;

/* Append o (NULL: null) as compact JSON, '/' unescaped, UTF-8 passed through, control
 * characters escaped. 0, or -ENOMEM (b then holds a partial text: reset len). */
int tr_json_append(tr_buf *b, const struct json_object *o);
void tr_buf_free(tr_buf *b);

#endif
