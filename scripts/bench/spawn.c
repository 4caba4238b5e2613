/* Runs a command and reports its peak RSS (ru_maxrss, KiB) on fd 3. A launcher this small
 * keeps the child's peak RSS its own: a child forked from a large process (Python) would
 * inherit that process's high-water mark across exec. The fd is $SPAWN_RSS_FD. */
#include <stdio.h>
#include <stdlib.h>
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
