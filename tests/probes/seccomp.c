/* What the RuntimeDefault seccomp profile lets a container do: clone with namespace flags, clone3, io_uring. */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <signal.h>
#include <sys/wait.h>
static int child(void *arg) { return 0; }
static char stack[65536];
int main(void) {
    int flags[] = {CLONE_NEWUSER, CLONE_NEWNET, 0};
    const char *names[] = {"newuser", "newnet", "plain"};
    for (int i = 0; i < 3; i++) {
        int pid = clone(child, stack + sizeof stack, flags[i] | SIGCHLD, NULL);
        if (pid < 0) printf("%s %s\n", names[i], strerror(errno)); else { waitpid(pid, NULL, 0); printf("%s ok\n", names[i]); }
    }
    long r = syscall(435 /* clone3 */, NULL, 0);
    printf("clone3 %s\n", r < 0 ? strerror(errno) : "ok");
    r = syscall(425 /* io_uring_setup */, 1, NULL);
    printf("io_uring %s\n", r < 0 ? strerror(errno) : "ok");
    return 0;
}
