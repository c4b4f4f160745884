/* What a control command looks like from outside: its name, parameters and help. Shared by
 * the hub (which validates requests against it) and evhubctl (which builds requests and
 * prints help from it), so neither needs to know any command by heart. */
#ifndef HUB_CONTROL_SPEC_H
#define HUB_CONTROL_SPEC_H

#include <stddef.h>

/* JSON-RPC 2.0 error codes, and evhub's own (-32000..-32099, "server error"). */
#define HUB_CTL_PARSE_ERROR      -32700 /* the request is not JSON */
#define HUB_CTL_INVALID_REQUEST  -32600 /* JSON, but not a JSON-RPC 2.0 request */
#define HUB_CTL_METHOD_NOT_FOUND -32601
#define HUB_CTL_INVALID_PARAMS   -32602
#define HUB_CTL_INTERNAL_ERROR   -32603
#define HUB_CTL_FAILED           -32000 /* the command ran and failed (e.g. a reload) */
#define HUB_CTL_NO_SUCH_CLIENT   -32001 /* no open connection has that id */
#define HUB_CTL_NO_RECIPIENT     -32002 /* nothing was delivered: no connection to send to */
#define HUB_CTL_STOPPING         -32003 /* the hub is shutting down */

typedef enum { HUB_CTL_STRING, HUB_CTL_INT, HUB_CTL_BOOL } hub_ctl_type;

typedef struct hub_ctl_param {
    const char *name; /* JSON name; evhubctl takes required ones in order, others as --name */
    hub_ctl_type type;
    int required;
    const char *help; /* one line */
} hub_ctl_param;

typedef struct hub_ctl_spec {
    const char *name;    /* the JSON-RPC method, also evhubctl's command word */
    const char *summary; /* one line */
    const char *help;    /* a paragraph, or NULL */
    const hub_ctl_param *params;
    size_t nparams;
} hub_ctl_spec;

/* The hub's own commands (control_spec.c); later features add theirs at run time. */
extern const hub_ctl_spec hub_ctl_core_specs[];
extern const size_t hub_ctl_core_nspecs;
/* The spec of a core command, or NULL. */
const hub_ctl_spec *hub_ctl_core_spec(const char *name);
const char *hub_ctl_type_name(hub_ctl_type t);

#endif
