// One training job on the WebAssembly module: shared by the worker (worker.js) and by the
// page itself when module workers are unavailable, so both paths run the same code.
//
// job = { checkpoint: Uint8Array, csv: string, plan: string (JSON),
//         baseVersion?: number, token?: string,  -- with a token it encodes an update
//         checkedInAt?: number, deadlineSecs?: number,  -- Date.now() at check-in and the
//         answer's deadline_secs: with a plan's partial_work, training stops in time for
//         the upload (steps < plannedSteps in the result)
//         evaluate?: true }  -- an evaluation round: {examples, loss, accuracy} of the
//         served model on the data, nothing trained

export function runJob(WebModel, job, onProgress) {
  const model = new WebModel(job.checkpoint);
  let data = null;
  let out = null;
  try {
    data = model.checkData(job.csv);
    if (job.evaluate) {
      // An evaluation round: score the served model; nothing is trained.
      out = model.evaluate(data);
      return { examples: out.examples, loss: out.loss, accuracy: out.accuracy ?? null };
    }
    const contributing = typeof job.token === "string";
    out = contributing
      ? model.localUpdate(
          data,
          job.plan,
          job.baseVersion,
          job.token,
          onProgress,
          job.checkedInAt,
          job.deadlineSecs,
        )
      : model.train(data, job.plan, onProgress);
    const names = model.parameterNames();
    const parameters = {};
    if (!contributing) {
      names.forEach((name, i) => {
        parameters[name] = Array.from(out.parameterValues(i));
      });
    }
    return {
      examples: out.examples,
      steps: out.steps,
      plannedSteps: out.plannedSteps,
      lossBefore: out.lossBefore,
      lossAfter: out.lossAfter,
      accuracyBefore: out.accuracyBefore ?? null,
      accuracyAfter: out.accuracyAfter ?? null,
      parameters,
      update: out.takeUpdate(),
    };
  } finally {
    if (out) out.free();
    if (data) data.free();
    model.free();
  }
}
