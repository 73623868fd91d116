package dev.starling;

/** What a step did. Fields a kind does not use are 0 ({@code loss} NaN, {@code updatesInRound} -1). */
public final class Outcome {
    /** Which outcome. */
    public enum Kind {
        /** The conditions do not meet the task's requirements: nothing was sent ({@code reason}). */
        NOT_ELIGIBLE,
        /** The server asked the device to come back in {@code waitSecs} ({@code reason}). */
        WAIT,
        /** Checked in: assigned to {@code round}. */
        ASSIGNED,
        /** The model {@code version} is saved locally. */
        DOWNLOADED,
        /** Trained on {@code examples} examples: the update is saved. */
        TRAINED,
        /** Scored the model (an evaluation round). */
        SCORED,
        /** The server took the update into {@code round}. */
        DELIVERED,
        /** The round no longer takes the contribution ({@code reason}); the device is idle again. */
        DROPPED,
    }

    public final Kind kind;
    public final long round;
    /** Whether the assigned round is an evaluation round. */
    public final boolean evaluation;
    public final long version;
    public final long examples;
    /** Local loss after training, or the score; NaN when unknown. */
    public final double loss;
    /** Updates in the round so far (delivered); -1 when an earlier try delivered it. */
    public final long updatesInRound;
    public final double waitSecs;
    public final String reason;

    /** Called by the native library. */
    Outcome(String kind, long round, boolean evaluation, long version, long examples,
            double loss, long updatesInRound, double waitSecs, String reason) {
        this.kind = Kind.valueOf(kind);
        this.round = round;
        this.evaluation = evaluation;
        this.version = version;
        this.examples = examples;
        this.loss = loss;
        this.updatesInRound = updatesInRound;
        this.waitSecs = waitSecs;
        this.reason = reason;
    }

    @Override
    public String toString() {
        switch (kind) {
            case ASSIGNED: return "assigned round=" + round + (evaluation ? " (evaluation)" : "");
            case DOWNLOADED: return "downloaded version=" + version;
            case TRAINED: return "trained examples=" + examples;
            case SCORED: return "scored examples=" + examples;
            case DELIVERED: return "delivered round=" + round + " updates=" + updatesInRound;
            case WAIT: return "wait " + waitSecs + "s: " + reason;
            default: return kind.name().toLowerCase() + ": " + reason;
        }
    }
}
