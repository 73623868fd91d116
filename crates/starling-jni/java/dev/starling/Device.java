package dev.starling;

/**
 * A resumable Starling device session, saved in a folder: one contribution as steps (check
 * in, download, train, upload) that can stop after any step and go on later, in another
 * process, from the folder. Each call blocks until its step is done (run it off the UI
 * thread); calls on one device are serialised. Every failure is a {@link StarlingException}.
 * Close a device (try-with-resources): one left to the garbage collector keeps its native
 * session (a runtime and an HTTP client) until the process ends.
 *
 * <pre>{@code
 * try (Device d = Device.open("https://fl.example.org", "keyboard", dir, credential)) {
 *     Outcome o;
 *     do {
 *         o = d.advance(csvPath, new Conditions(true, true, true, 0.9f));
 *     } while (o.kind != Outcome.Kind.DELIVERED && o.kind != Outcome.Kind.NOT_ELIGIBLE
 *              && o.kind != Outcome.Kind.WAIT);
 * }
 * }</pre>
 */
public final class Device implements AutoCloseable {
    static {
        System.loadLibrary("starling_jni");
    }

    private long handle;

    private Device(long handle) {
        this.handle = handle;
    }

    /**
     * Opens (or creates) the session of {@code task} saved in {@code stateDir}, against
     * {@code server}; {@code credential} from {@link #enroll} for an enrolled task, or null.
     */
    public static Device open(String server, String task, String stateDir, String credential)
            throws StarlingException {
        return open(server, task, stateDir, credential, null);
    }

    /** Like {@link #open(String, String, String, String)}, trusting the CA certificates in a PEM file too. */
    public static Device open(String server, String task, String stateDir, String credential,
                              String caPemPath) throws StarlingException {
        return new Device(nativeOpen(server, task, stateDir, caPemPath, credential));
    }

    /**
     * Enrolls this device in an enrolled task with the task's enrollment secret; answers the
     * device's credential, shown this once: keep it privately and pass it to {@link #open}.
     */
    public static String enroll(String server, String task, String secret, String label,
                                String caPemPath) throws StarlingException {
        return nativeEnroll(server, task, secret, label, caPemPath);
    }

    /** Checks in when the conditions meet the task's requirements. Step "idle". */
    public synchronized Outcome checkIn(Conditions c) throws StarlingException {
        Conditions k = c == null ? Conditions.UNKNOWN : c;
        return nativeCheckIn(handle, Conditions.flag(k.charging), Conditions.flag(k.idle),
                Conditions.flag(k.unmetered), Conditions.level(k.battery));
    }

    /** Downloads the assignment's model. Step "assigned". */
    public synchronized Outcome download() throws StarlingException {
        return nativeDownload(handle);
    }

    /** Trains with the built-in trainer on a CSV file (target: last column). Step "downloaded". */
    public synchronized Outcome trainCsv(String path) throws StarlingException {
        return nativeTrainCsv(handle, path);
    }

    /** The downloaded model as safetensors bytes (spec and version in its metadata). */
    public synchronized byte[] model() throws StarlingException {
        return nativeModel(handle);
    }

    /**
     * A host's own training: the new weights as safetensors (the model's tensors by name,
     * F32), trained on {@code examples} examples with the local {@code loss} (NaN: unknown).
     * Step "downloaded".
     */
    public synchronized Outcome submitParams(byte[] safetensors, long examples, float loss)
            throws StarlingException {
        return nativeSubmitParams(handle, safetensors, examples, loss);
    }

    /** Uploads the update. Step "ready". */
    public synchronized Outcome upload() throws StarlingException {
        return nativeUpload(handle);
    }

    /** Runs the next step, training on the CSV file when that is the next step. */
    public synchronized Outcome advance(String csvPath, Conditions c) throws StarlingException {
        Conditions k = c == null ? Conditions.UNKNOWN : c;
        return nativeAdvance(handle, csvPath, Conditions.flag(k.charging), Conditions.flag(k.idle),
                Conditions.flag(k.unmetered), Conditions.level(k.battery));
    }

    /** Drops whatever is in hand: the session is idle again. */
    public synchronized void reset() throws StarlingException {
        nativeReset(handle);
    }

    /** The step: "idle", "assigned", "downloaded" or "ready". */
    public synchronized String step() throws StarlingException {
        return nativeStep(handle);
    }

    /** Frees the native session; its folder stays, to be opened again. */
    @Override
    public synchronized void close() {
        if (handle != 0) {
            nativeClose(handle);
            handle = 0;
        }
    }

    /** Tests only: a Rust panic inside a native call, which must arrive as an exception. */
    static void panicForTests() throws StarlingException {
        nativePanicForTests();
    }

    private static native long nativeOpen(String server, String task, String stateDir,
                                          String caPemPath, String credential) throws StarlingException;
    private static native String nativeEnroll(String server, String task, String secret,
                                              String label, String caPemPath) throws StarlingException;
    private static native Outcome nativeCheckIn(long h, int charging, int idle, int unmetered,
                                                float battery) throws StarlingException;
    private static native Outcome nativeDownload(long h) throws StarlingException;
    private static native Outcome nativeTrainCsv(long h, String path) throws StarlingException;
    private static native byte[] nativeModel(long h) throws StarlingException;
    private static native Outcome nativeSubmitParams(long h, byte[] safetensors, long examples,
                                                     float loss) throws StarlingException;
    private static native Outcome nativeUpload(long h) throws StarlingException;
    private static native Outcome nativeAdvance(long h, String csvPath, int charging, int idle,
                                                int unmetered, float battery) throws StarlingException;
    private static native void nativeReset(long h) throws StarlingException;
    private static native String nativeStep(long h) throws StarlingException;
    private static native void nativeClose(long h);
    private static native void nativePanicForTests() throws StarlingException;
}
