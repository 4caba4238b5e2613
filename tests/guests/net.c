#include "probe.h"
void scenario_net(void) { fail("net not written yet"); }
