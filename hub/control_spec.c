/* The hub's own control commands, as evhubctl and the control socket see them. */
#include "hub/control_spec.h"

#include <string.h>

#define N(a) (sizeof(a) / sizeof((a)[0]))

static const hub_ctl_param clients_params[] = {
    {"tag", HUB_CTL_STRING, 0, "only connections carrying this tag"},
};
static const hub_ctl_param close_params[] = {
    {"id", HUB_CTL_INT, 1, "connection id"},
    {"reason", HUB_CTL_STRING, 0, "sent to the client in the error frame and logged"},
};
static const hub_ctl_param tag_params[] = {
    {"id", HUB_CTL_INT, 1, "connection id"},
    {"tag", HUB_CTL_STRING, 1, "the new tag; \"\" removes it"},
};
static const hub_ctl_param relay_params[] = {
    {"data", HUB_CTL_STRING, 1, "the payload, sent as one frame"},
};
static const hub_ctl_param tagged_params[] = {
    {"tag", HUB_CTL_STRING, 1, "connection tag"},
    {"data", HUB_CTL_STRING, 1, "the payload, sent as one frame"},
};
static const hub_ctl_param stats_params[] = {
    {"prometheus", HUB_CTL_BOOL, 0, "answer in the Prometheus text format"},
};
static const hub_ctl_param level_params[] = {
    {"level", HUB_CTL_STRING, 0, "crit, err, warn, notice, info or debug; none: show it"},
};

const hub_ctl_spec hub_ctl_core_specs[] = {
    {"commands", "list every command the hub answers, with its parameters", NULL, NULL, 0},
    {"status", "version, uptime, connections, workers and their queues, the script", NULL, NULL, 0},
    {"clients", "the open connections: id, address, tag, traffic, bytes queued",
     "Connections that are closing but still writing what was queued are listed with state "
     "\"closing\".",
     clients_params, N(clients_params)},
    {"close", "close a connection (what is queued to it is written first)",
     "The client receives {\"error\":\"closed\",\"reason\":...} and the script's "
     "connection-closed handler runs.",
     close_params, N(close_params)},
    {"tag", "set or remove a connection's tag", NULL, tag_params, N(tag_params)},
    {"relay", "send a frame to every connection", "Fails with no recipient when none is open.",
     relay_params, N(relay_params)},
    {"multicast", "send a frame to every connection carrying a tag",
     "Fails with no recipient when no connection carries the tag.", tagged_params,
     N(tagged_params)},
    {"unicast", "send a frame to one connection carrying a tag",
     "The connection is chosen by [evapi] unicast (first or round_robin), as for scripts. Fails "
     "with no recipient when no connection carries the tag.",
     tagged_params, N(tagged_params)},
    {"stats", "every counter: connections, frames, bytes, errors, Lua, worker queues",
     "Counters only grow while the hub runs; gauges (clients, queue depths) go up and down.",
     stats_params, N(stats_params)},
    {"reload", "reload the script, keeping connections and their tags (as SIGHUP)",
     "The new script is checked first; if it does not load, the old one keeps running and the "
     "command fails. Answers once every worker runs the new script.",
     NULL, 0},
    {"log-level", "show or set the log level", NULL, level_params, N(level_params)},
};
const size_t hub_ctl_core_nspecs = N(hub_ctl_core_specs);

const hub_ctl_spec *hub_ctl_core_spec(const char *name)
{
    for (size_t i = 0; i < hub_ctl_core_nspecs; i++) {
        if (strcmp(hub_ctl_core_specs[i].name, name) == 0)
            return &hub_ctl_core_specs[i];
    }
    return NULL;
}

const char *hub_ctl_type_name(hub_ctl_type t)
{
    switch (t) {
    case HUB_CTL_STRING:
        return "string";
    case HUB_CTL_INT:
        return "integer";
    case HUB_CTL_BOOL:
        return "boolean";
    }
    return "?";
}
