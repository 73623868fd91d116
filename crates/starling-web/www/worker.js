// Trains off the page's main thread, so the page stays responsive and the progress bar
// moves while a larger model trains. Messages: {id, job} in; {id, type: "progress" |
// "done" | "error", ...} out. The data arrives here from the page and goes nowhere else.
import init, { WebModel } from "./starling_web.js";
import { runJob } from "./job.js";

const ready = init();

self.onmessage = async (event) => {
  const { id, job } = event.data;
  try {
    await ready;
    const result = runJob(WebModel, job, (step, total, loss) => {
      self.postMessage({ id, type: "progress", step, total, loss });
    });
    // An evaluation's result has no update to hand over.
    const transfer = result.update ? [result.update.buffer] : [];
    self.postMessage({ id, type: "done", result }, transfer);
  } catch (e) {
    self.postMessage({ id, type: "error", message: String((e && e.message) || e) });
  }
};

self.postMessage({ type: "loaded" });
