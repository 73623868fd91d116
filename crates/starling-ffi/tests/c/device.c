/* A device in C over libstarling_ffi, driven by tests/it/c.rs against a real server.
 *
 *   device rounds <server> <state_dir> <csv>
 *       Two contributions: the first with starling_session_advance until delivered, freeing
 *       the session after the download and reopening it from its folder (as a new process
 *       would); the second with the host's own "training" (the downloaded weights sent back
 *       through starling_session_model / starling_session_submit_params) and an upload.
 *   device errors <server> <state_dir> <secret>
 *       Against an enrolled task: errors arrive as status codes with the server's code name,
 *       and bad arguments (NULL, a missing file, a step out of order) as their own codes.
 *
 * Prints one line per check; exits 0 when all passed. */

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "starling.h"

static int failures = 0;

static void check(int ok, const char *what) {
    if (ok) {
        printf("ok %s\n", what);
    } else {
        printf("FAIL %s: status message \"%s\" code \"%s\"\n", what,
               starling_last_error_message(), starling_last_error_code());
        failures++;
    }
}

static int32_t open_session(const char *server, const char *dir, const char *credential,
                            StarlingSession **s) {
    return starling_session_open(server, "linear", dir, NULL, credential, s);
}

static int rounds(const char *server, const char *dir, const char *csv) {
    StarlingSession *s = NULL;
    StarlingOutcome out;
    StarlingConditions ready = {1, 1, 1, 1.0f};
    if (open_session(server, dir, NULL, &s) != STARLING_OK) {
        check(0, "open");
        return 1;
    }
    check(strcmp(starling_session_step(s), "idle") == 0, "a new session is idle");

    /* Round 1: advance until delivered, stopping after the download. */
    int delivered = 0;
    for (int i = 0; i < 50 && !delivered; i++) {
        int32_t status = starling_session_advance(s, csv, &ready, &out);
        if (status != STARLING_OK) {
            check(0, "advance");
            starling_session_free(s);
            return 1;
        }
        switch (out.kind) {
        case STARLING_OUTCOME_KIND_ASSIGNED:
            printf("assigned round=%llu\n", (unsigned long long)out.round);
            break;
        case STARLING_OUTCOME_KIND_DOWNLOADED:
            printf("downloaded version=%llu\n", (unsigned long long)out.version);
            starling_session_free(s);
            s = NULL;
            check(open_session(server, dir, NULL, &s) == STARLING_OK, "reopen after download");
            check(strcmp(starling_session_step(s), "downloaded") == 0,
                  "the reopened session resumes at downloaded");
            break;
        case STARLING_OUTCOME_KIND_TRAINED:
            printf("trained examples=%llu loss=%s\n", (unsigned long long)out.examples,
                   isnan(out.loss) ? "unknown" : "known");
            break;
        case STARLING_OUTCOME_KIND_DELIVERED:
            printf("delivered round=%llu updates=%lld\n", (unsigned long long)out.round,
                   (long long)out.updates_in_round);
            delivered = 1;
            break;
        case STARLING_OUTCOME_KIND_WAIT:
            printf("wait %.2fs: %s\n", out.wait_secs, out.reason);
            break;
        default:
            printf("outcome %d: %s\n", (int)out.kind, out.reason);
            break;
        }
    }
    check(delivered, "round 1 delivered");

    /* Round 2: the host's own training. Check in until assigned (the server may ask the
     * device to wait while it commits round 1). */
    int assigned = 0;
    for (int i = 0; i < 50 && !assigned; i++) {
        if (starling_session_check_in(s, &ready, &out) != STARLING_OK) break;
        assigned = out.kind == STARLING_OUTCOME_KIND_ASSIGNED;
    }
    check(assigned, "round 2 assigned");
    check(starling_session_download(s, &out) == STARLING_OK &&
              out.kind == STARLING_OUTCOME_KIND_DOWNLOADED,
          "round 2 downloaded");
    printf("downloaded version=%llu\n", (unsigned long long)out.version);
    uint8_t *model = NULL;
    size_t len = 0;
    check(starling_session_model(s, &model, &len) == STARLING_OK && len > 0, "model bytes");
    printf("model bytes=%zu\n", len);
    check(starling_session_submit_params(s, model, len, 10, NAN, &out) == STARLING_OK &&
              out.kind == STARLING_OUTCOME_KIND_TRAINED,
          "submit params");
    starling_bytes_free(model, len);
    check(strcmp(starling_session_step(s), "ready") == 0, "ready after submit");
    check(starling_session_upload(s, &out) == STARLING_OK &&
              out.kind == STARLING_OUTCOME_KIND_DELIVERED,
          "round 2 delivered");
    printf("delivered round=%llu updates=%lld\n", (unsigned long long)out.round,
           (long long)out.updates_in_round);
    starling_session_free(s);
    return failures ? 1 : 0;
}

static int errors(const char *server, const char *dir, const char *secret) {
    StarlingSession *s = NULL;
    StarlingOutcome out;

    /* NULL arguments: a status, not a crash. */
    check(open_session(NULL, dir, NULL, &s) == STARLING_ERR_INVALID_ARGUMENT,
          "NULL server is an invalid argument");
    printf("message: %s\n", starling_last_error_message());
    check(starling_session_check_in(NULL, NULL, &out) == STARLING_ERR_INVALID_ARGUMENT,
          "NULL session is an invalid argument");
    check(starling_session_step(NULL) == NULL, "NULL session has no step");

    if (open_session(server, dir, NULL, &s) != STARLING_OK) {
        check(0, "open");
        return 1;
    }
    check(starling_session_check_in(s, NULL, NULL) == STARLING_ERR_INVALID_ARGUMENT,
          "NULL out is an invalid argument");

    /* The server's refusal, with its code name. */
    check(starling_session_check_in(s, NULL, &out) == STARLING_ERR_REFUSED,
          "check-in without a credential is refused");
    printf("code: %s\n", starling_last_error_code());
    check(strcmp(starling_last_error_code(), "missing_credential") == 0,
          "the code is missing_credential");

    /* Local errors. */
    check(starling_session_train_csv(s, "/nonexistent/data.csv", &out) == STARLING_ERR_DATA,
          "a missing CSV is a data error");
    check(strlen(starling_last_error_code()) == 0, "a local error has no server code");
    check(starling_session_download(s, &out) == STARLING_ERR_STATE,
          "download before check-in is out of order");
    starling_session_free(s);

    /* A wrong enrollment secret is refused; the right one gives a credential that works. */
    char *credential = NULL;
    check(starling_enroll(server, "linear", "not the secret at all", NULL, NULL, &credential) ==
              STARLING_ERR_REFUSED,
          "a wrong secret is refused");
    printf("code: %s\n", starling_last_error_code());
    check(starling_enroll(server, "linear", secret, "c-test", NULL, &credential) == STARLING_OK &&
              credential != NULL,
          "enrolled");
    check(open_session(server, dir, credential, &s) == STARLING_OK, "open with credential");
    starling_string_free(credential);
    check(starling_session_check_in(s, NULL, &out) == STARLING_OK &&
              out.kind == STARLING_OUTCOME_KIND_ASSIGNED,
          "an enrolled device is assigned");
    starling_session_free(s);
    return failures ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: device rounds|errors <server> <state_dir> <csv|secret>\n");
        return 2;
    }
    if (strcmp(argv[1], "rounds") == 0) return rounds(argv[2], argv[3], argv[4]);
    if (strcmp(argv[1], "errors") == 0) return errors(argv[2], argv[3], argv[4]);
    fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
}
