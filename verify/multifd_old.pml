/* multifd send side as QEMU had it before 9.0 (spec 6.4): one counter p->pending_job for
   page jobs and sync requests alike, and a SYNC flag the requester sets in the shared
   p->flags. A wake-up takes the flags as they are and writes whatever batch the channel
   holds. Expected: SPIN finds I1 violated (a SYNC packet with pages; the empty packet
   follows). Check: scripts/verify.sh. */

mtype = { NONE, POST_SEM, POST_SEM_SYNC, POST_CHANNELS_READY, WRITE };

#include "props.pml"

byte pending[NCH];     /* p->pending_job: requests not yet written, jobs and syncs alike */
bool sync_flag[NCH];   /* MULTIFD_FLAG_SYNC in p->flags */

#define HAS_JOB(c) (pending[c] > 0)   /* multifd_send_pages() takes a channel with !pending_job */
#define SETTLED(c) (pending[c] == 0 && !sync_flag[c])

inline hand_job(c) {
    d_step {
        pending[c]++; batch[c] = true; asked_jobs[c]++;
        printf("MSC: requester: queues a page job on multifd/%d: pending_job=%d\n", c, pending[c])
    }
    sem[c]++
}

inline request_sync(c) {
    d_step {
        /* multifd_send_sync_main(): p->flags |= MULTIFD_FLAG_SYNC; p->pending_job++ */
        pending[c]++; sync_flag[c] = true;
        asked_sync[c] = true; jobs_before_sync[c] = asked_jobs[c];
        printf("MSC: requester: requests a sync on multifd/%d: pending_job=%d flags=SYNC\n",
               c, pending[c])
    }
    sem[c]++
}

#include "requester.pml"

active [NCH] proctype channel() {
    byte c = _pid - 1;
    bool flags;
    mtype act;
    d_step { channels_ready++; idle[c] = true }   /* the init packet is written */
end_wait:
    do
    :: atomic { sem[c] > 0 -> sem[c]--; idle[c] = false }
        d_step {
            /* under p->mutex: take the flags as they are and clear them */
            printf("MSC: multifd/%d wakes up: pending_job=%d flags=%d\n",
                   c, pending[c], sync_flag[c]);
            if
            :: pending[c] > 0 -> flags = sync_flag[c]; sync_flag[c] = false; act = WRITE
            :: else -> act = NONE
            fi
        }
        if
        :: act == WRITE ->
            d_step { check_write(c, flags, batch[c]); batch[c] = false }
            d_step {
                pending[c]--;
                if
                :: flags -> act = POST_SEM_SYNC
                :: else -> act = POST_CHANNELS_READY
                fi;
                flags = false
            }
            d_step { post(c, act); act = NONE; idle[c] = true }
        :: else -> d_step { post(c, act); act = NONE; idle[c] = true }
        fi
    od
}
