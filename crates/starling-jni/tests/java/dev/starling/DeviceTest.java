package dev.starling;

/**
 * Driven by tests/it/main.rs against a real server.
 *
 *   DeviceTest rounds <server> <stateDir> <csv>: two contributions through JNI, the first
 *     with advance() (closing the device after the download and reopening it from its
 *     folder), the second with the host's own weights (model() sent back by submitParams).
 *   DeviceTest errors <server> <stateDir> <secret>: against an enrolled task, a refusal, bad
 *     arguments and a panic arrive as StarlingException; enrolling gives a credential that
 *     works.
 *
 * Prints one line per check; exits 0 when all passed.
 */
public final class DeviceTest {
    private static int failures = 0;

    private static void check(boolean ok, String what) {
        System.out.println((ok ? "ok " : "FAIL ") + what);
        if (!ok) failures++;
    }

    private static final Conditions READY = new Conditions(true, true, true, 1.0f);

    static void rounds(String server, String dir, String csv) throws StarlingException {
        Device d = Device.open(server, "linear", dir, null);
        check(d.step().equals("idle"), "a new device is idle");
        boolean delivered = false;
        for (int i = 0; i < 50 && !delivered; i++) {
            Outcome o = d.advance(csv, READY);
            System.out.println(o);
            if (o.kind == Outcome.Kind.DOWNLOADED) {
                d.close();
                d = Device.open(server, "linear", dir, null);
                check(d.step().equals("downloaded"), "the reopened device resumes at downloaded");
            }
            delivered = o.kind == Outcome.Kind.DELIVERED;
        }
        check(delivered, "round 1 delivered");

        try (Device e = d) {
            Outcome o = null;
            for (int i = 0; i < 50; i++) {
                o = e.checkIn(READY);
                if (o.kind == Outcome.Kind.ASSIGNED) break;
                Thread.sleep(100);
            }
            check(o != null && o.kind == Outcome.Kind.ASSIGNED, "round 2 assigned");
            System.out.println(e.download());
            byte[] model = e.model();
            System.out.println("model bytes=" + model.length);
            check(e.submitParams(model, 10, Float.NaN).kind == Outcome.Kind.TRAINED, "submit params");
            System.out.println(e.upload());
        } catch (InterruptedException ie) {
            check(false, "interrupted");
        }
        // Closed: a call is an exception, not a crash.
        try {
            d.step();
            check(false, "a closed device throws");
        } catch (StarlingException ex) {
            check(ex.getStatus() == StarlingException.STATE, "a closed device throws");
        }
    }

    static void errors(String server, String dir, String secret) throws StarlingException {
        try (Device d = Device.open(server, "linear", dir, null)) {
            try {
                d.checkIn(Conditions.UNKNOWN);
                check(false, "check-in without a credential is refused");
            } catch (StarlingException e) {
                System.out.println("code: " + e.getCode() + " status: " + e.getStatus());
                check(e.getStatus() == StarlingException.REFUSED
                        && e.getCode().equals("missing_credential"),
                        "check-in without a credential is refused");
            }
            try {
                d.trainCsv("/nonexistent/data.csv");
                check(false, "a missing CSV is a data error");
            } catch (StarlingException e) {
                check(e.getStatus() == StarlingException.DATA && e.getCode().isEmpty(),
                        "a missing CSV is a data error");
            }
            try {
                d.trainCsv(null);
                check(false, "a null path is an invalid argument");
            } catch (StarlingException e) {
                check(e.getStatus() == StarlingException.INVALID_ARGUMENT,
                        "a null path is an invalid argument");
            }
        }
        try {
            Device.enroll(server, "linear", "not the secret at all", null, null);
            check(false, "a wrong secret is refused");
        } catch (StarlingException e) {
            System.out.println("code: " + e.getCode() + " status: " + e.getStatus());
            check(e.getStatus() == StarlingException.REFUSED, "a wrong secret is refused");
        }
        String credential = Device.enroll(server, "linear", secret, "java-test", null);
        try (Device d = Device.open(server, "linear", dir, credential)) {
            check(d.checkIn(Conditions.UNKNOWN).kind == Outcome.Kind.ASSIGNED,
                    "an enrolled device is assigned");
        }
        try {
            Device.panicForTests();
            check(false, "a panic is an exception");
        } catch (StarlingException e) {
            System.out.println("panic: " + e.getMessage());
            check(e.getStatus() == StarlingException.PANIC, "a panic is an exception");
        }
    }

    public static void main(String[] args) throws Exception {
        if (args[0].equals("rounds")) {
            rounds(args[1], args[2], args[3]);
        } else {
            errors(args[1], args[2], args[3]);
        }
        System.exit(failures == 0 ? 0 : 1);
    }
}
