/* multifd send side, our design (QEMU 9.0+): two request flags per channel, stepped
   through the engine's own table (send_table.pml, generated from handshake.SEND_TABLE).
   Check: scripts/verify.sh, or spin -a -DNCH=2 multifd_new.pml; gcc -o pan pan.c; ./pan */

#include "send_table.pml"
#include "props.pml"

byte state[NCH];   /* the channel's SendState (bit 0 pending_job, bit 1 pending_sync) */

#define HAS_JOB(c) PENDING_JOB(state[c])   /* Sender._idle_channel()'s test */
#define SETTLED(c) (state[c] == 0)

/* The requester's steps; st and act are its locals. */
inline hand_job(c) {
    d_step {
        /* under the channel's lock: swap the batch in, step HAND_JOB */
        send_step(state[c], HAND_JOB, st, act);
        state[c] = st; st = 0;
        batch[c] = true;
        asked_jobs[c]++;
        printf("MSC: requester: queues a page job on multifd/%d: state %d\n", c, state[c])
    }
    d_step { post(c, act); act = NONE }
}

inline request_sync(c) {
    d_step {
        send_step(state[c], REQUEST_SYNC, st, act);
        state[c] = st; st = 0;
        asked_sync[c] = true;
        jobs_before_sync[c] = asked_jobs[c];
        printf("MSC: requester: requests a sync on multifd/%d: state %d\n", c, state[c])
    }
    d_step { post(c, act); act = NONE }
}

#include "requester.pml"

active [NCH] proctype channel() {
    byte c = _pid - 1;
    byte st;
    mtype act;
    d_step { channels_ready++; idle[c] = true }   /* the init packet is written */
end_wait:
    do
    :: atomic { sem[c] > 0 -> sem[c]--; idle[c] = false }
        d_step {
            printf("MSC: multifd/%d wakes up: state %d\n", c, state[c]);
            send_step(state[c], WAKE, st, act); state[c] = st; st = 0
        }
        if
        :: act == SEND_PAGES ->
            d_step { check_write(c, false, batch[c]); batch[c] = false }
            d_step { send_step(state[c], PAGES_SENT, st, act); state[c] = st; st = 0 }
            d_step { post(c, act); act = NONE; idle[c] = true }
        :: act == SEND_SYNC ->
            d_step { check_write(c, true, false) }
            d_step { send_step(state[c], SYNC_SENT, st, act); state[c] = st; st = 0 }
            d_step { post(c, act); act = NONE; idle[c] = true }
        :: else -> d_step { post(c, act); act = NONE; idle[c] = true }
        fi
    od
}
