/* Generated from multifd.engine.handshake.SEND_TABLE by
   `python -m multifd.engine.explore --promela`: do not edit (tests/model checks it).
   A state is a byte: bit 0 pending_job, bit 1 pending_sync. */
mtype = { HAND_JOB, REQUEST_SYNC, WAKE, PAGES_SENT, SYNC_SENT };
mtype = { NONE, POST_SEM, SEND_PAGES, SEND_SYNC, POST_CHANNELS_READY, POST_SEM_SYNC };
#define PENDING_JOB(s) ((s) & 1)
#define PENDING_SYNC(s) (((s) >> 1) & 1)

inline send_step(s, e, next, act) {
    if
    :: s == 0 && e == HAND_JOB -> next = 1; act = POST_SEM
    :: s == 0 && e == REQUEST_SYNC -> next = 2; act = POST_SEM
    :: s == 1 && e == REQUEST_SYNC -> next = 3; act = POST_SEM
    :: s == 1 && e == WAKE -> next = 1; act = SEND_PAGES
    :: s == 3 && e == WAKE -> next = 3; act = SEND_PAGES
    :: s == 2 && e == WAKE -> next = 2; act = SEND_SYNC
    :: s == 0 && e == WAKE -> next = 0; act = NONE
    :: s == 1 && e == PAGES_SENT -> next = 0; act = POST_CHANNELS_READY
    :: s == 3 && e == PAGES_SENT -> next = 2; act = POST_CHANNELS_READY
    :: s == 2 && e == SYNC_SENT -> next = 0; act = POST_SEM_SYNC
    :: else -> assert(false) /* IllegalTransitionError */
    fi
}
