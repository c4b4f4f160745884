/* The hub: one libev loop that owns every socket, optional Lua worker threads. */
#ifndef HUB_HUB_H
#define HUB_HUB_H

#include "hub/config.h"
#include "hub/script.h"

typedef struct hub hub;

/* Build a hub from cfg (copied) that runs scripts through ops; binds the listener and loads
 * the script in every thread that will run it. NULL with err set on failure. */
hub *hub_new(const hub_config *cfg, const hub_script_ops *ops, char *err, size_t errlen);
/* Start the modules (threads, the evapi listener last: "listening on" is logged once all
 * are up). 0, or <0 with err set. hub_run does it if it was not done. */
int hub_start(hub *h, char *err, size_t errlen);
/* Run until SIGTERM/SIGINT (or hub_stop); returns 0 after a clean shutdown. */
int hub_run(hub *h);
/* NULL-safe; closes every connection without flushing. */
void hub_destroy(hub *h);
/* Load and check the script of cfg once, as -t does. 0, or -EINVAL with err set. */
int hub_check_script(const hub_config *cfg, const hub_script_ops *ops, char *err, size_t errlen);

#endif
