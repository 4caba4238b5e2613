/* Runs a command and reports its peak RSS (ru_maxrss, KiB) on fd 3. A launcher this small
 * keeps the child's peak RSS its own: a child forked from a large process (Python) would
 * inherit that process's high-water mark across exec. The fd is $SPAWN_RSS_FD.
 * If WISP_TRACE_STARTUP is set, it becomes the CLOCK_MONOTONIC time (ns) just before the
 * execve, which wisp's start-up trace counts from. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
	const char *fd_env = getenv("SPAWN_RSS_FD");
	int fd = fd_env ? atoi(fd_env) : 2;
	if (argc < 2)
		return 127;
	pid_t pid = fork();
	if (pid == 0) {
		if (fd > 2)
			close(fd);
		if (getenv("WISP_TRACE_STARTUP")) {
			struct timespec ts;
			char buf[32];
			clock_gettime(CLOCK_MONOTONIC, &ts);
			snprintf(buf, sizeof(buf), "%lld",
				 (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
			setenv("WISP_TRACE_STARTUP", buf, 1);
		}
		execvp(argv[1], argv + 1);
		_exit(127);
	}
	int status;
	struct rusage ru;
	if (wait4(pid, &status, 0, &ru) < 0)
		return 127;
	dprintf(fd, "%ld %d\n", ru.ru_maxrss, pid);
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
