/* What both send-side designs must guarantee: each assertion's comment names the
   property (scripts/verify.sh prints it when the assertion fails). Included by
   multifd_new.pml and multifd_old.pml, which define the channels' state, HAS_JOB(c),
   SETTLED(c) and the inlines hand_job(c) and request_sync(c), then include requester.pml.

   The bookkeeping is per epoch: an epoch ends when sync() returns, and the counters are
   reset then, so the model stays finite while the requester runs forever (any number of
   sync() calls, up to JOBS page jobs between two of them). */

#ifndef NCH
#define NCH 2
#endif
#ifndef JOBS
#define JOBS 4
#endif
#if NCH < 1 || NCH > 3
#error "NCH must be 1, 2 or 3"
#endif

byte sem[NCH];            /* the channel's sem: a request is pending */
byte sem_sync[NCH];       /* the channel's sem_sync: its SYNC packet is written */
byte channels_ready;      /* shared: a channel can take a job */
bool batch[NCH];          /* the channel holds a batch of pages */
bool idle[NCH];           /* the channel thread waits on its sem */

byte asked_jobs[NCH];     /* jobs handed to the channel this epoch */
byte wrote_jobs[NCH];     /* packets with pages it wrote this epoch */
bool asked_sync[NCH];     /* sync() requested its SYNC this epoch */
bool wrote_sync[NCH];     /* it wrote that SYNC */
byte jobs_before_sync[NCH]; /* asked_jobs when the sync was requested */
bool in_sync;             /* sync() is running */

/* Every sync request is eventually answered: sync() returns. */
ltl answered { [] (in_sync -> <> !in_sync) }

#define SYNC_IN_ORDER(c) (asked_sync[c] && !wrote_sync[c] && wrote_jobs[c] == jobs_before_sync[c])
#define JOB_IN_ORDER(c) (!wrote_sync[c] && wrote_jobs[c] < asked_jobs[c])
#define ALL_WRITTEN(c) (wrote_sync[c] && wrote_jobs[c] == asked_jobs[c])

inline check_write(c, is_sync, pages) {
    printf("MSC: multifd/%d sends a packet: SYNC=%d pages=%d\n", c, is_sync, pages);
    assert(!(is_sync && pages));   /* I1: a SYNC packet carries no pages */
    assert(is_sync || pages);      /* I2: no packet is neither SYNC nor pages */
    if
    :: is_sync ->
        assert(SYNC_IN_ORDER(c)); /* I3: one SYNC per request, after the jobs handed before it */
        wrote_sync[c] = true
    :: else ->
        assert(JOB_IN_ORDER(c)); /* I3: each job written once, before the SYNC of its epoch */
        wrote_jobs[c]++
    fi
}

inline check_waiter(c) {
    assert(ALL_WRITTEN(c)); /* WAITER: sync() returns once the channels wrote all they were asked */
}

inline post(c, act) {
    if
    :: act == POST_SEM -> sem[c]++
    :: act == POST_SEM_SYNC -> sem_sync[c]++
    :: act == POST_CHANNELS_READY -> channels_ready++
    :: else -> skip
    fi
}

#define QUIET(c) (idle[c] && sem[c] == 0)
#if NCH == 1
#define ALL_QUIET (QUIET(0))
#elif NCH == 2
#define ALL_QUIET (QUIET(0) && QUIET(1))
#else
#define ALL_QUIET (QUIET(0) && QUIET(1) && QUIET(2))
#endif
