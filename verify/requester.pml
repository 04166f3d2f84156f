/* The requester (the migration thread) of Sender.send_pages() and Sender.sync(),
   shared by both designs. */

active proctype requester() {
    byte c, k, next, jobs;
    byte st;     /* the state a table step returns (our design) */
    mtype act;   /* the action it returns */
    do
    :: jobs < JOBS ->
        /* send_pages() of one batch: wait for an idle channel, round-robin from next */
        atomic { channels_ready > 0 -> channels_ready-- }
        do
        :: k == NCH -> assert(false)   /* NO_IDLE: channels_ready promises an idle channel */
        :: k < NCH && HAS_JOB((next + k) % NCH) -> k++
        :: k < NCH && !HAS_JOB((next + k) % NCH) ->
            d_step { c = (next + k) % NCH; next = (c + 1) % NCH; k = 0 }
            hand_job(c);
            d_step { jobs++; c = 0 }
            break
        od
    :: true ->
        /* sync(): request a SYNC on every channel, then wait for each sem_sync */
        in_sync = true;
        do
        :: c < NCH -> request_sync(c); c++
        :: else -> c = 0; break
        od;
        do
        :: c < NCH -> atomic { sem_sync[c] > 0 -> sem_sync[c]--; check_waiter(c) }; c++
        :: else ->
            d_step {
                /* sync() returns: a new epoch */
                c = 0;
                do
                :: c < NCH ->
                    asked_jobs[c] = 0; wrote_jobs[c] = 0; asked_sync[c] = false;
                    wrote_sync[c] = false; jobs_before_sync[c] = 0; c++
                :: else -> break
                od;
                c = 0; jobs = 0; in_sync = false;
                printf("MSC: requester: sync() returns; the marker may be written\n")
            }
            break
        od
    :: true -> break   /* returns for good */
    od;
    /* Once every thread waits on an empty sem, nothing may be left: no lost job. */
    ALL_QUIET;
    d_step {
        do
        :: c < NCH ->
            assert(SETTLED(c) && !batch[c] && wrote_jobs[c] == asked_jobs[c]); /* I3: no lost job */
            c++
        :: else -> break
        od
    }
}
